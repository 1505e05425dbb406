# The README's two commands: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test test-gpu bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned to the on-disk CPU wheel, only when no torch is importable:
# an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): $(PY) setup.cfg setup.py
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

# 2 processes on the CPU (gloo), the tiny offline VLM and the synthetic task; one thread per process. Then the
# trained policy in closed loop on 50 unseen synthetic episodes per mode, all in lockstep (docs/sim.md). A second
# `make demo` replaces runs/demo (--overwrite_output_dir): the demo is a fixed recipe, not a run to keep.
demo: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml \
		-m vla_energy.training.train --config demo --overwrite_output_dir
	OMP_NUM_THREADS=1 $(VENV)/bin/vla-energy rollout runs/demo --episodes 50 --batch_size 50
	@echo "demo finished: report in runs/demo/report.md (metrics.json, plots beside it); closed loop in runs/demo/rollout/report.md"

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest tests

# Only the tests marked `gpu`: the recipe under each accelerate config (recipes/accelerate/) on 1 GPU, bf16 and fp16.
test-gpu: $(STAMP)
	$(PY) -m pytest tests -m gpu -rs

bench: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) benchmarks/run_all.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache
