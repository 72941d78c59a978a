# `make demo` and `make test` work on a fresh Debian/Ubuntu machine: they install ffmpeg (apt)
# and a virtual environment in .venv first, then run. Torch is pinned to the local CPU wheel.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
# Tiny ops on 2 cores are far slower with more than one thread; DeepSpeed runs on its CPU
# accelerator wherever there is no CUDA.
export OMP_NUM_THREADS ?= 1
export DS_ACCELERATOR ?= $(shell $(PY) -c "import shutil; print('cuda' if shutil.which('nvidia-smi') else 'cpu')")
export WANDB_MODE ?= disabled
export TOKENIZERS_PARALLELISM ?= false
# vtt-train compiles no DeepSpeed op on CPU (trainer/run/dist.py skips the shm comm op); should another op
# ever be built, its cache stays with the venv so two checkouts do not recompile over each other's.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: demo test test-all lint install sysdeps bench clean

sysdeps:
	@command -v ffmpeg >/dev/null && command -v ffprobe >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg; }

# constraints-min.txt pins every dependency to its setup.cfg floor: the floors are what the tests run on.
$(STAMP): setup.cfg pyproject.toml constraints-min.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(FIND_LINKS) -c constraints-min.txt "torch==2.13.0" -e ".[test]"
	touch $(STAMP)

install: sysdeps $(STAMP)

demo: install
	$(BIN)/python scripts/demo.py --out demo-out

test: install lint
	$(BIN)/python -m pytest -m "not slow" -q

lint: install
	$(BIN)/ruff check .

test-all: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/bench_prep.py

clean:
	rm -rf demo-out .pytest_cache
