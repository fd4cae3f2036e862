# Two commands on a fresh machine: `make demo` (the main job on the embedded demo data) and `make test`.
# Each creates .venv and installs the tested set (constraints.txt) first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= demo
WORKERS ?= $(shell nproc)

.PHONY: venv demo test test-fast lint bench clean gpu-check chaos

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

# preprocess -> train (the paper's two-tower split as 2 CPU processes over gloo) -> 10-crop evaluation
# -> figure 4 (nearest training images) -> the run report (curves, errors vs the paper, figure 3)
demo: venv
	$(PY) -m preprocess make-demo $(DEMO)/src
	$(PY) -m preprocess shard --src $(DEMO)/src/train --out $(DEMO)/shards --split train --workers $(WORKERS)
	$(PY) -m preprocess shard --src $(DEMO)/src/val --devkit $(DEMO)/src/devkit --out $(DEMO)/shards --split val --workers $(WORKERS)
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node=2 -m launch.train \
		--config configs/demo.toml --data $(DEMO)/shards --run-dir $(DEMO)/run --tp 2
	$(PY) -m pipeline.tools.evaluate --run-dir $(DEMO)/run --checkpoint best --ten-crop true
	$(PY) -m pipeline.tools.analysis neighbours --run-dir $(DEMO)/run --checkpoint best
	$(PY) -m pipeline.tools.report $(DEMO)/run
	@echo "Run report: $(DEMO)/run/report/report.md (figures in $(DEMO)/run/report and $(DEMO)/run/figures)"
	@echo "TensorBoard logs: $(DEMO)/run/tensorboard  (view: $(VENV)/bin/tensorboard --logdir $(DEMO)/run/tensorboard)"

# everything (CI's command): preprocessing to real Slurm, emulated nodes and fault injection; ~20 min on 2 cores
test: lint
	$(PY) -m pytest -q --durations=15 tests

# the inner loop: no Slurm, no network namespaces, no multi-process training, nothing slow (tiers: tests/support/tiers.py)
test-fast: venv
	$(PY) -m pytest -q --durations=10 -m "not (slurm or netns or multiprocess or slow)" tests

# ruff's lint and format check (settings in pyproject.toml); `ruff format .` fixes the formatting
lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: venv
	$(PY) -m preprocess bench

# On a GPU machine, with the machine's own torch (not .venv) and DALI, simplejpeg and webdataset installed
# beside it (docs/gpu-check.md): CUDA tests, a 1-GPU run (mixed decode, bf16, channels_last, compile), a CPU
# checkpoint resumed on the GPU, the GPU report and the pre-flight; one report in GPU_CHECK_OUT. Refuses
# without CUDA.
GPU_CHECK_OUT ?= gpu-check
gpu-check:
	$(PYTHON) -m pipeline.bench.gpu_check --out $(GPU_CHECK_OUT)

# A seeded chaos campaign (root: it makes network namespaces): one run on four emulated nodes, faults drawn by
# SEED from FAULTS (default: every kind in the catalogue, tests/support/chaos.py), then the
# checks that nothing was lost. `make chaos SEED=7 FAULTS=kill-rank,link-cut,preempt COUNT=6`; output in CHAOS_OUT.
SEED ?= 1
FAULTS ?=
COUNT ?= 0
CHAOS_OUT ?= chaos-out
chaos: venv
	OMP_NUM_THREADS=1 $(PY) -m tests.support.chaos --seed $(SEED) --count $(COUNT) --out $(CHAOS_OUT) $(if $(FAULTS),--faults $(FAULTS))

clean:
	rm -rf $(DEMO) .pytest_cache
