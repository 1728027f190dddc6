# gpderiv: the one source of the project's commands (CI calls these targets via .ci/run).

PYTHON ?= python3
PIP := $(PYTHON) -m pip

# The CPU build of torch. An unpinned `torch` would pull a multi-GB CUDA build,
# so torch is installed pinned first, and then held at whatever version is
# installed while the package and its extras are installed.
TORCH_SPEC ?= torch==2.13.0

# Extras installed by `make install`.
EXTRAS ?= test

# Headless plotting everywhere (override: `make demo MPLBACKEND=TkAgg`).
export MPLBACKEND = Agg

# Only lint the directories that exist (empty ones are not tracked by git).
LINT_PATHS := $(wildcard gpderiv tests examples benchmarks)

STAMP := .install.stamp

.PHONY: all install test demo lint bench docs clean

all: test

install: $(STAMP)

# Re-run the install only when the packaging files change (or after `make clean`).
$(STAMP): setup.cfg pyproject.toml
	@if ! $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
		echo ">>> torch not importable: installing the CPU wheel ($(TORCH_SPEC))"; \
		$(PIP) install "$(TORCH_SPEC)"; \
	fi
	@torch_pin="torch==$$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
	echo ">>> installing gpderiv[$(EXTRAS)] (editable), holding $$torch_pin"; \
	$(PIP) install -e ".[$(EXTRAS)]" "$$torch_pin"
	@$(PYTHON) -c "import torch, gpytorch; print('>>> torch', torch.__version__, '| gpytorch', gpytorch.__version__)"
	@touch $@

test: install
	$(PYTHON) -m pytest -q tests

demo: install
	$(PYTHON) examples/franke_2d.py

lint: install
	$(PYTHON) -m ruff check $(LINT_PATHS)

bench: install
	$(PYTHON) benchmarks/bench_mll.py

# HTML docs into docs/_build/html, offline, warnings as errors. The docs extra (Sphinx, MyST,
# Furo, MathJax served locally by sphinx-mathjax-offline, scikit-learn for the API page) is installed when missing, holding torch. The build
# runs the examples for their figures when those are missing or stale (docs/conf.py).
DOCS_IMPORTS := import sphinx, myst_parser, furo, sklearn, importlib; importlib.import_module('sphinx-mathjax-offline')

docs: install
	@if ! $(PYTHON) -c "$(DOCS_IMPORTS)" >/dev/null 2>&1; then \
		torch_pin="torch==$$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
		echo ">>> installing gpderiv[docs] (editable), holding $$torch_pin"; \
		$(PIP) install -e ".[docs]" "$$torch_pin"; \
	fi
	$(PYTHON) -m sphinx -E -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(STAMP) build dist *.egg-info .eggs .pytest_cache .ruff_cache .hypothesis \
		docs/_build examples/output
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
