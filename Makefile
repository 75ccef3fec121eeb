# The two set-up commands of the README: `make demo` and `make test`. Both build .venv from scratch when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Offline by default: nothing in the demo or the tests may reach a model hub.
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: install install-dev demo test bench bench-gpu clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, alone, so pip takes the torchvision built for that very torch
	$(PIP) install -q torch torchvision
	$(PIP) install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) run.py -m experiment=demo
	$(PY) run.py -m experiment=demo_base2new
	$(PY) run.py -m experiment=demo_vit
	$(PY) run.py -m experiment=demo_beyond_labels
	$(PY) run.py -m experiment=demo_upl
	$(PY) run.py -m experiment=demo_ship
	$(VENV)/bin/promptbench report outputs/demo --out outputs/demo
	$(VENV)/bin/promptbench report outputs/demo --metric robust_top1 --out outputs/demo/robust

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
