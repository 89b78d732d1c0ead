# The README's two commands: `make demo` and `make test`. Each sets up what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# 2.13.0 lies on these machines' disk as a CPU wheel, so pip takes it without downloading
# gigabytes; on a GPU machine the same pin takes PyPI's CUDA build. Override freely:
#   make demo TORCH='torch==2.14.1'
TORCH  ?= torch==2.13.0

.PHONY: demo test test-slow test-gpu bench bench-quality bench-anchors venv dev system-deps clean

$(VENV)/.base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

# Keras 3 for the side-by-side benchmark; it runs on the torch already installed.
$(VENV)/.bench: $(VENV)/.base
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[bench]"
	touch $@

venv: $(VENV)/.base
dev: $(VENV)/.dev

# $(call apt-need,CHECK,PACKAGE,WHO): unless the shell test CHECK passes, install Debian's
# PACKAGE when root (quietly; `apt-get update` only if the first try fails), else say how.
apt-need = if ! $(1); then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -q $(2) >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null && apt-get install -y -q $(2) >/dev/null)) || \
	    echo "note: could not install $(2); $(3) will say so"; \
	  else echo "note: run 'sudo apt-get install $(2)' for $(3)"; fi; \
	fi

# Debian's Fashion-MNIST is the offline source for `--data fashion-mnist`; Debian's
# Chromium renders `aekit report` pages in the browser tests.
system-deps:
	@$(call apt-need,[ -d /usr/share/datasets/fashion-mnist ],dataset-fashion-mnist,the Fashion-MNIST tests)
	@$(call apt-need,command -v chromium >/dev/null,chromium,the report's browser tests)

# The seed experiment: MNIST, the blog's network, the default recipe for 20 epochs, into a new
# runs/ folder (without --model seed, aekit train trains the default model, pca-conv).
demo: venv
	$(VENV)/bin/aekit data fetch mnist
	$(VENV)/bin/aekit train --model seed --epochs 20

# Two pytest-xdist workers of one PyTorch thread each: the tests are many small trainings,
# which two threads in one process share worse than two processes do.
TEST_WORKERS ?= 2

test: dev system-deps
	$(PY) -m pytest -n $(TEST_WORKERS)

# The slow runs, and the fuzz tests again with 5,000 examples each instead of 100.
test-slow: dev system-deps
	HYPOTHESIS_PROFILE=slow $(PY) -m pytest -m "slow or fuzz"

# On a GPU machine: CUDA against the CPU, DDP with NCCL on every GPU, export, the estimator
# and the bench's CUDA rows (tests/test_gpu.py). Without a CUDA GPU it fails, never skips.
test-gpu: dev
	@$(PY) -c 'import sys, torch; torch.cuda.is_available() or sys.exit( \
	  f"make test-gpu: PyTorch {torch.__version__} sees no CUDA GPU (built for CUDA {torch.version.cuda}); " \
	  "run it on a GPU machine; on one, make clean test-gpu replaces a CPU-only PyTorch with the CUDA build from PyPI")'
	$(PY) -m pytest -m gpu

# Training and encoding speed against stock Keras and a plain PyTorch loop (bench/RESULTS.md).
bench: $(VENV)/.bench
	$(PY) bench/speed.py

# aekit's defaults against PCA on every kind of image: bench/QUALITY.md (about an hour on 2 cores).
bench-quality: $(VENV)/.base
	$(PY) bench/quality.py

# The field's published results on their own protocols beside PCA and aekit: bench/ANCHORS.md
# (hours on 2 cores; it goes on from the cells an interrupted run left in bench/anchors-cells.jsonl).
# Its likelihood row trains Pythae beside aekit, hence the bench extras.
bench-anchors: $(VENV)/.bench
	$(PY) bench/anchors.py --resume

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
