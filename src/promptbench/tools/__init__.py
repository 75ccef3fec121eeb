"""Tools beside the framework, not part of it: they use promptbench, promptbench does not use them.

- `bench`: `make bench`, promptbench's speed against reference-style code (`python -m promptbench.tools.bench`).
- `pretrain`: pretraining of the bundled mini CLIP (`promptbench pretrain-mini`).
- `miniworld`: the procedural world of shapes the mini CLIP is pretrained on and its downstream tasks. The
  framework's one use of a tool: `SyntheticDataset` (data/datasets/synthetic.py) renders a task on first use.
"""
