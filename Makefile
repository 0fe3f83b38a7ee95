# phds-serve developer entry points. `make install` builds .venv in the repo root.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# PyPI's torchvision/torchaudio/torchcodec break `import transformers` beside the CPU torch.
BROKEN_BESIDE_CPU_TORCH := torchvision torchaudio torchcodec

.PHONY: install serve test test-all bench tiny-model loadtest clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[cpu,dev]"
	$(PIP) uninstall -y -q $(BROKEN_BESIDE_CPU_TORCH) 2>/dev/null || true
	$(PY) -c "import transformers, vllm, phds_serve; print('phds-serve installed: vllm', vllm.__version__)"
	touch $@

serve: install
	$(VENV)/bin/phds-serve $(ARGS)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -q -m "" $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/k_scaling.py

# Rebuild the bundled tiny OLMoE from scratch (tokenizer, pretrain at k=4, PHDS), seeded; ~15-40 min on 2 cores.
tiny-model: install
	$(PY) -m phds_serve.train.tiny --work runs/tiny-olmoe --out phds_serve/assets/tiny-olmoe $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
