# The README's two commands: `make demo` (set up, train on the bundled faces, evaluate, draw) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FACEVAE := $(VENV)/bin/facevae
# Installed first where torch is missing, so that pip never swaps in another (multi-GB CUDA) build.
TORCH_SPEC ?= torch==2.13.0
RUN ?= runs/lfw-faces

.PHONY: install demo test test-slow bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install --disable-pip-version-check -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(FACEVAE) train --config configs/lfw-faces.toml --out $(RUN)
	$(FACEVAE) evaluate $(RUN) --iw-samples 100
	$(FACEVAE) sample $(RUN) -n 32 --out $(RUN)/images/sample.png
	$(FACEVAE) reconstruct $(RUN) -n 16 --out $(RUN)/images/reconstruct.png
	@echo "demo done: see $(RUN)/images/reconstruct.png, $(RUN)/images/sample.png and $(RUN)/eval.json"

test: install
	$(PY) -m pytest -q -m "not slow"

test-slow: install
	$(PY) -m pytest -q -m slow

bench: install
	$(PY) benchmarks/evaluate.py

clean:
	rm -rf $(VENV) runs .pytest_cache
