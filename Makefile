# The README's two commands: `make demo` and `make test`. Each sets up what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# 2.13.0 lies on these machines' disk as a CPU wheel, so pip takes it without downloading
# gigabytes; on a GPU machine the same pin takes PyPI's CUDA build. Override freely:
#   make demo TORCH='torch==2.14.1'
TORCH  ?= torch==2.13.0

.PHONY: demo test test-slow bench venv dev system-deps clean

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

# Debian's Fashion-MNIST is the offline source for `--data fashion-mnist`.
system-deps:
	@if [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)) || \
	    echo "note: could not install dataset-fashion-mnist; its tests will say so"; \
	  else echo "note: run 'sudo apt-get install dataset-fashion-mnist' for the Fashion-MNIST tests"; fi; \
	fi

# The seed experiment: MNIST, the seed network, the default recipe, into a new runs/ folder.
demo: venv
	$(VENV)/bin/aekit data fetch mnist
	$(VENV)/bin/aekit train

test: dev system-deps
	$(PY) -m pytest

test-slow: dev system-deps
	$(PY) -m pytest -m slow

# Training and encoding speed against stock Keras and a plain PyTorch loop (bench/RESULTS.md).
bench: $(VENV)/.bench
	$(PY) bench/speed.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
