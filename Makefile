# `make test` and `make demo` work on a fresh machine with nothing but Python.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
OUT ?= bench-out

.PHONY: venv test demo bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	# CPU build of torch, pinned for this environment (the package itself needs torch>=2.5).
	$(PIP) install -q torch==2.13.0
	# natten is a source package: build it against the torch above, not in an isolated env.
	$(PIP) install -q --no-build-isolation -e ".[test,bench]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -x -p no:cacheprovider

# The tour of the families (workload `tour`), without the per-case memory subprocesses (`anyattn bench
# softmax memory` measures memory), two seconds of timing per case, mode and dtype.
demo: venv
	$(VENV)/bin/anyattn bench tour --no-memory --budget 2 --out $(OUT)

bench: demo

clean:
	rm -rf $(VENV) $(OUT)
