"""promptbench: few-shot adaptation of CLIP-like models behind one interface."""

from promptbench.config import register_resolvers

__version__ = "0.1.0"

# Configs are resolved in processes that never ran run.py, too: a SLURM job unpickles its task and config and
# only imports the promptbench modules they name; registering on import covers every such process.
register_resolvers()
