# The README's two commands: `make demo` (set up, train on the bundled faces, evaluate, draw) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FACEVAE := $(VENV)/bin/facevae
# Installed first where torch is missing, so that pip never swaps in another (multi-GB CUDA) build.
TORCH_SPEC ?= torch==2.13.0
# The extras whose tests `make test` (and so CI) runs beside the core's.
EXTRAS ?= test,web,onnx,tensorboard
RUN ?= runs/lfw-faces

# The likelihood table (facevae.distributions.LIKELIHOODS), read when compare-demo runs.
LIKELIHOODS = $(shell $(PY) -c "from facevae.distributions import LIKELIHOODS; print(*LIKELIHOODS)")
COMPARE_EPOCHS ?= 100

.PHONY: install demo test test-slow tutorial bench mutate compare-demo clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install --disable-pip-version-check -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(FACEVAE) train --config configs/lfw-faces.toml --out $(RUN)
	$(FACEVAE) evaluate $(RUN) --iw-samples 100
	$(FACEVAE) sample $(RUN) -n 32 --out $(RUN)/images/sample.png
	$(FACEVAE) reconstruct $(RUN) -n 16 --out $(RUN)/images/reconstruct.png
	$(FACEVAE) interpolate $(RUN) test:0 test:1
	$(FACEVAE) traverse $(RUN) --image test:0 --dims 8
	$(FACEVAE) analogy $(RUN) test:0 test:1 test:2
	$(FACEVAE) report $(RUN)
	@echo "demo done: see $(RUN)/report.html (numbers, curves, pictures), $(RUN)/images/ (reconstruct, sample, interpolate, traverse, analogy) and $(RUN)/eval.json"
	@echo "to use the facevae command yourself, first run:  . $(VENV)/bin/activate"

test: install
	$(PY) -m pytest -q -m "not slow"

test-slow: install
	$(PY) -m pytest -q -m slow

# Rebuild docs/tutorial.ipynb from docs/make_tutorial.py, run it, and render docs/tutorial.md with its figures.
tutorial: install
	$(PY) docs/make_tutorial.py

# Mutation testing (mutmut, the `mutate` extra) of the likelihoods, bounds, training state, atomic writes, checkpoints
# and splits, each module in a temporary copy with the in-process tests that cover it (the scope of each, and the
# equivalent mutants, in docs/mutation-equivalents.md): MODULES="fileio metrics" for some of them.
MODULES ?=
MUTATE_ARGS ?=  # e.g. --budget 600: seconds per module, the mutants not reached are reported as not checked
mutate: install
	$(PY) -c "import mutmut" 2>/dev/null || $(PY) -m pip install --disable-pip-version-check -q -e ".[mutate]"
	$(PY) tools/mutate.py $(MODULES) $(MUTATE_ARGS)

bench: install
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/evaluate.py
	$(PY) benchmarks/prepare.py

# Every likelihood on the demo faces for the same budget, then one table (Markdown) and one picture.
compare-demo: install
	for l in $(LIKELIHOODS); do \
	  $(FACEVAE) train --config configs/lfw-faces.toml --out runs/compare/$$l --quiet \
	    --set likelihood=$$l --set epochs=$(COMPARE_EPOCHS) --set image_every=$(COMPARE_EPOCHS) && \
	  $(FACEVAE) evaluate runs/compare/$$l --iw-samples 100 > /dev/null || exit 1; \
	done
	$(FACEVAE) compare $(addprefix runs/compare/,$(LIKELIHOODS)) --out runs/compare/compare.png \
	  | tee runs/compare/compare.md

clean:
	rm -rf $(VENV) runs .pytest_cache
