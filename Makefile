# q-psa: two commands on a fresh machine (no virtual environment needed):
#   make quickstart   sets everything up, then runs the main job on the default bundled model
#   make test         sets everything up, then runs the whole test suite (CI runs exactly this)
PYTHON ?= python3
PIP := $(PYTHON) -m pip --disable-pip-version-check
QPSA := $(PYTHON) -m qpsa

.PHONY: setup quickstart test test-fast bench

# torch first, pinned to its CPU build: a range that admits a newer torch would pull a multi-GB CUDA build.
setup:
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[models,test,cluster]' ray==2.60.0
	@# headless Chromium for tests/report/test_browser.py; where it cannot be installed those tests skip
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 \
		|| echo "chromium not installed: the browser tests (tests/report/test_browser.py) will skip"

quickstart: setup
	$(QPSA) models
	$(QPSA) inspect smollm2-135m --layer 0
	$(QPSA) ppl smollm2-135m --chunks 20
	$(QPSA) study smollm2-135m --quick

test: setup
	$(PYTHON) -m pytest

test-fast:
	$(PYTHON) -m pytest -m "not slow"

bench: setup
	$(PYTHON) bench/ppl_speed.py
	$(PYTHON) bench/load_speed.py
	$(PYTHON) bench/ablation_cost.py
	$(PYTHON) bench/qpsa_cost.py
	$(PYTHON) bench/quantize_speed.py --llama Q4_K_M
