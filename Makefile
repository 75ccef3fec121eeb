# The two set-up commands of the README: `make demo` and `make test`. Both build .venv from scratch when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Offline by default: nothing in the demo or the tests may reach a model hub.
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: install install-dev demo demo-lane1 demo-lane2 test bench bench-gpu clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, alone, so pip takes the torchvision built for that very torch
	$(PIP) install -q torch torchvision
	$(PIP) install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# `make demo` runs its sweeps in two lanes, one per core, each process on one torch thread: the mini models are too
# small for intra-op threads to pay (two threads per process were slower, not faster, on 2 cores). Lane 1 is the
# few-shot table (the longest sweep, printed as it runs); lane 2 the other parts, logged to outputs/demo/lane2.log.
# Both lanes share the rendered world and the feature cache, which are safe to fill from two processes at once.
DEMO_LANE2 := demo_base2new demo_vit demo_beyond_labels demo_upl demo_ship
DEMO_ENV := OMP_NUM_THREADS=1

demo: install
	$(MAKE) --no-print-directory -j2 demo-lane1 demo-lane2
	$(VENV)/bin/promptbench report outputs/demo --out outputs/demo
	$(VENV)/bin/promptbench report outputs/demo --metric robust_top1 --out outputs/demo/robust

demo-lane1:
	$(DEMO_ENV) $(PY) run.py -m experiment=demo

# Zero-shot learns nothing: its seeds 1-3 run once (at 16 shots) here instead of at every shot count in lane 1.
demo-lane2:
	@mkdir -p outputs/demo
	@echo "lane 2 ($(DEMO_LANE2), zero-shot of experiment=demo): log in outputs/demo/lane2.log"
	@( $(DEMO_ENV) $(PY) run.py -m experiment=demo method=zeroshot shots=16 && \
	   for preset in $(DEMO_LANE2); do $(DEMO_ENV) $(PY) run.py -m experiment=$$preset || exit 1; done \
	 ) > outputs/demo/lane2.log 2>&1 || { tail -n 40 outputs/demo/lane2.log; echo "lane 2 failed: outputs/demo/lane2.log"; exit 1; }
	@echo "lane 2 done"

# Two workers, one test file each at a time (module fixtures such as the SLURM cluster stay in one process).
test: install
	$(PY) -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

bench: install
	$(PY) -m promptbench.tools.bench --out experiments $(BENCH_ARGS)

# On a GPU machine: the real-shape steps, the text tower's FLOP rate and the ImageNet-shaped epoch, bf16 autocast.
bench-gpu: install
	$(PY) -m promptbench.tools.bench --device cuda --out experiments --sections real_shapes text_flops imagenet_epoch \
		--flops-classes 100 1000 $(BENCH_ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
