# Borderline: two commands do everything on a fresh machine with Python 3.11 and pip.
#   make book   set up, run every stage on the default (synthetic) data, build the book
#   make test   set up, run every test
#   make check  lint and every test that does not run a whole pipeline (a few minutes)
# Other targets: make stage STAGE=02_train [PARAMS="-p epochs 3"], make nbval, make bench,
# make bench-quick, make bench-memory, make bench-decode, make bench-rate, make gpu-check,
# make clean.

PYTHON ?= python3.11
PROFILE ?= default
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup book stages stage nbval test check browser bench bench-quick bench-memory bench-decode \
	bench-rate gpu-check lint clean

setup: $(STAMP)

# Rebuilt only when the pinned dependencies change.
$(STAMP): pyproject.toml constraints.txt build-constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11 ...'"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet pip==26.3
	# adv-lib needs visdom, whose source build needs a setuptools that still has pkg_resources
	$(PY) -m pip install --quiet -c constraints.txt --build-constraint build-constraints.txt \
		--config-settings editable_mode=compat -e .
	touch $(STAMP)

# Every stage of the chosen profile, in order, into data/runs/$(PROFILE).
stages: $(STAMP)
	$(PY) -m lib.run.pipeline run --profile $(PROFILE)

# One stage with other parameters, e.g. make stage STAGE=03_attack PARAMS="-p lr0 0.01"
stage: $(STAMP)
	$(PY) -m lib.run.pipeline run --profile $(PROFILE) --stage $(STAGE) $(PARAMS)

# The rerun proof: execute the profile's notebooks again in a fresh folder; every stored
# output must come back (pytest --nbval, strict, with tests/nbval-sanitize.cfg).
nbval: $(STAMP)
	$(PY) -m lib.run.rerun data/runs/$(PROFILE)

book: stages
	$(PY) -m lib.run.pipeline book --profile $(PROFILE)
	$(VENV)/bin/jupyter-book build . -W -n --keep-going
	@echo "open _build/html/index.html"

# Headless Chromium for the tests that open built pages (Debian package, needs root).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: $(STAMP) browser
	$(VENV)/bin/pytest

# The fast loop while changing code: ruff, then every test not marked pipeline (the notebook
# chain, kill-and-resume, reruns, book builds, browser and stage-command subprocess runs,
# marked in tests/conftest.py). make test stays the complete suite. lib/data is named on its
# own: ruff's exclusion of the git-ignored data folder ("data" in pyproject.toml) matches it too.
check: $(STAMP)
	$(VENV)/bin/ruff check lib lib/data tests notebooks benchmarks
	$(VENV)/bin/pytest -q -m "not pipeline"

# The attack engine's speed in both precisions, agreement and memory (benchmarks/bench_attack.py);
# bench-quick: a smaller trained model and job, within 10 minutes on two CPU cores.
bench: $(STAMP)
	$(PY) benchmarks/bench_attack.py

bench-quick: $(STAMP)
	$(PY) benchmarks/bench_attack.py --quick

# Peak resident memory of loading, one epoch and one evaluation over N and 4N frames at 224 px.
bench-memory: $(STAMP)
	$(PY) benchmarks/bench_memory.py

# The data stage's decoding rate at 854 x 480 and the Cholec80 decode time derived from it.
bench-decode: $(STAMP)
	$(PY) benchmarks/bench_decode.py

# The machine's rate (AlexNet float32 forward + backward to the input, 64 px, batch 128): the
# yardstick of the build times in the reproduce chapter.
bench-rate: $(STAMP)
	$(PY) benchmarks/bench_rate.py

# The GPU check (CUDA when present, else tiny sizes on the CPU). On a bare GPU machine with only
# torch and torchvision installed: python benchmarks/gpu_check.py
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

lint: $(STAMP)
	$(VENV)/bin/ruff check lib lib/data tests notebooks benchmarks

clean:
	rm -rf _build book/executed _static/vega-*.js
