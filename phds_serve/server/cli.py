"""``phds-serve``: ``vllm serve`` plus the declared-k layer.

All of vLLM's flags pass through (its own parser and its own ``serve``
command run the server); ours are added in one group. With no model given it
serves the bundled tiny OLMoE with CPU-sized defaults; on a CPU platform any
model gets the CPU-safe subset of them (memory fraction, eager mode). Flags the
user gives always win.

Order matters: ``PROMETHEUS_MULTIPROC_DIR`` must be set before vLLM or
prometheus_client are imported anywhere (prometheus_client picks its value
backend at import, and the engine process inherits the environment), so this
module imports vLLM only inside :func:`main`.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import sys
import tempfile
from typing import Any

logger = logging.getLogger("phds_serve.server")

MIDDLEWARE = "phds_serve.server.middleware.PhdsMiddleware"
SHUTDOWN_TIMEOUT_S = 30  # default --shutdown-timeout: in-flight requests may finish after SIGTERM
_NO_MODEL = "\0phds-no-model"


def _owned_tempdir(env_var: str, prefix: str) -> str | None:
    """A private temp dir in ``env_var``, removed at exit by the process that made it
    (spawned children run atexit too); None when the user already set ``env_var``."""
    if os.environ.get(env_var):
        return None
    path = tempfile.mkdtemp(prefix=prefix)
    os.environ[env_var] = path
    pid = os.getpid()
    atexit.register(lambda: os.getpid() == pid and shutil.rmtree(path, ignore_errors=True))
    return path


def ensure_multiproc_dir() -> str:
    """Turn on prometheus_client multiprocess mode (a fresh temp dir unless the user set one)."""
    made = _owned_tempdir("PROMETHEUS_MULTIPROC_DIR", "phds-prometheus-")
    if made is None:
        os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
    return os.environ["PROMETHEUS_MULTIPROC_DIR"]


def ensure_rpc_dir() -> str | None:
    """vLLM's ZMQ IPC sockets go to ``$VLLM_RPC_BASE_PATH`` (default: the temp dir) and stay there after
    the server exits, clean shutdown or not. Give them a private directory, removed at exit, unless the
    user chose one."""
    return _owned_tempdir("VLLM_RPC_BASE_PATH", "phds-rpc-")


def add_phds_args(parser: argparse.ArgumentParser) -> None:
    from phds_serve.server.feedforward import ARRIVAL_QUANTILE, HEADROOM, MAX_UTILISATION, ONSET_BUDGET_K

    group = parser.add_argument_group(
        "phds-serve (declared k)",
        "Per-request k: top-level \"k\" or vllm_xargs.k in the request; precedence "
        "explicit k > tier header > --default-k > native k.",
    )
    group.add_argument(
        "--tiers", dest="phds_tiers", default=None,
        help="Tier table: 'fast=1,balanced=4..2,quality=8..6' (nominal..lowest k: a range brownout "
        "may lower the tier's k within; optionally ':priority=-10') or a YAML file path "
        "({tiers: {fast: {k: 1, priority: -10}, balanced: {k: 4, min_k: 2}}}).",
    )
    group.add_argument(
        "--tier-header", dest="phds_tier_header", default="x-phds-tier",
        help="Request header naming the tier (default: x-phds-tier).",
    )
    group.add_argument(
        "--binding-tiers", dest="phds_binding_tiers", action="store_true", default=False,
        help="A tier is a ceiling: a request's explicit k above its tier's k gets HTTP 400.",
    )
    group.add_argument(
        "--max-k", dest="phds_max_k", type=int, default=None,
        help="Widen the allowed k from [1, native k] to [1, N] (N <= number of experts); "
        "passed to the engine as hf_overrides phds_max_k.",
    )
    group.add_argument(
        "--default-k", dest="phds_default_k", type=int, default=None,
        help="k of requests that name neither k nor a tier (default: the native k).",
    )
    brownout = parser.add_argument_group(
        "phds-serve brownout (elastic k under load)",
        "Off unless a latency objective is set. While objectives are missed the server lowers the "
        "k of tiers with a range (never below the tier's lowest k); explicit k is never changed; "
        "k is chosen once per request, when it enters the engine (predictive) or arrives (reactive).",
    )
    brownout.add_argument("--slo-ttft-ms", dest="phds_slo_ttft_ms", type=float, default=None,
                          help="Time-to-first-token objective (milliseconds, at --slo-quantile).")
    brownout.add_argument("--slo-itl-ms", dest="phds_slo_itl_ms", type=float, default=None,
                          help="Inter-token latency objective (milliseconds, at --slo-quantile).")
    brownout.add_argument("--slo-quantile", dest="phds_slo_quantile", type=float, default=0.9,
                          help="Quantile the objectives apply to (default 0.9).")
    brownout.add_argument("--brownout-interval-ms", dest="phds_brownout_interval_ms", type=float,
                          default=500.0, help="Controller tick (default 500 ms).")
    brownout.add_argument("--brownout-window-ms", dest="phds_brownout_window_ms", type=float,
                          default=2000.0, help="Latency samples of the last this many ms count (default 2000).")
    brownout.add_argument("--brownout-down-after", dest="phds_brownout_down_after", type=int, default=10,
                          help="Ticks of headroom before k goes back up one step (default 10).")
    brownout.add_argument("--brownout-mode", dest="phds_brownout_mode", choices=["predictive", "reactive"],
                          default="predictive",
                          help="predictive (default): requests wait in the layer for an engine slot and get the "
                          "highest k whose predicted TTFT and inter-token latency meet the objectives (a service "
                          "model measured at start-up, scaled online; arrival rate; queued work), with the "
                          "reactive controller as a safety cap. reactive: k from the reactive level at arrival.")
    brownout.add_argument("--brownout-headroom", dest="phds_brownout_headroom", type=float, default=HEADROOM,
                          help="Predictive: a k is chosen when its predicted latencies stay within this fraction "
                          f"of the objectives (default {HEADROOM:g}; lower trades k for attainment).")
    brownout.add_argument("--brownout-max-utilisation", dest="phds_brownout_max_utilisation", type=float,
                          default=MAX_UTILISATION, help="Predictive: a k is chosen only when the measured arrival "
                          f"rate keeps the engine's predicted utilisation at or below this (default {MAX_UTILISATION:g}).")
    brownout.add_argument("--brownout-arrival-quantile", dest="phds_brownout_arrival_quantile", type=float,
                          default=ARRIVAL_QUANTILE, help="Predictive: the inter-token prediction takes the "
                          "prefill of the requests arriving during a request's life at this quantile of their "
                          "Poisson count at the measured rate, not at the rate itself "
                          f"(default {ARRIVAL_QUANTILE:g}: the rate).")
    brownout.add_argument("--brownout-onset-budget-k", dest="phds_brownout_onset_budget_k", type=float,
                          default=ONSET_BUDGET_K, help="Predictive: a k above the tier's lowest is chosen only "
                          "while the steps of k above the lowest of the requests in the engine and this one sum to "
                          "at most this (6: one k 8 request above k 2): the work a burst that no estimate has seen "
                          "yet finds to clear (default inf: no budget).")
    brownout.add_argument("--brownout-late-defer-ms", dest="phds_brownout_late_defer_ms", type=float,
                          default=2000.0, help="Predictive, with a TTFT objective: a request still queued past "
                          "its TTFT objective yields its place to requests that can still meet theirs, for at most "
                          "about this long (default 2000; 0: first come, first served).")
    brownout.add_argument("--no-brownout-calibrate", dest="phds_brownout_calibrate", action="store_false",
                          default=True, help="Predictive: skip the start-up probes (a few seconds); the service "
                          "model starts from a prior shape, scaled online.")
    trust = parser.add_argument_group(
        "phds-serve tier trust",
        "Tier headers are honoured only from the gateway (shared secret or trusted proxy address; "
        "with neither configured: loopback clients only) or from an API key mapped to a tier.",
    )
    trust.add_argument("--tier-secret", dest="phds_tier_secret", default=None,
                       help="Shared secret the gateway sends (default: $PHDS_TIER_SECRET); >= 16 characters.")
    trust.add_argument("--tier-secret-header", dest="phds_tier_secret_header", default="x-phds-gateway-secret",
                       help="Header carrying the gateway's secret (default: x-phds-gateway-secret).")
    trust.add_argument("--trusted-proxies", dest="phds_trusted_proxies", default=None,
                       help="Addresses/networks whose tier headers are trusted, e.g. '10.0.0.0/8,127.0.0.1'.")
    trust.add_argument("--api-key-tiers", dest="phds_api_key_tiers", default=None,
                       help="API key -> tier: 'KEY=fast,KEY2=quality' or a YAML file ({keys: {KEY: tier}}).")
    trust.add_argument("--require-api-key", dest="phds_require_api_key", action="store_true", default=False,
                       help="Only the keys of --api-key-tiers (and --api-key) are accepted: any other key, or "
                       "none, gets vLLM's HTTP 401 on /v1/*. One list of keys for authentication and tiers.")
    trust.add_argument("--untrusted-tier", dest="phds_untrusted_tier", choices=["reject", "ignore"],
                       default="reject", help="An untrusted tier header: HTTP 400 (reject, default) or dropped.")


def build_parser():
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(
        prog="phds-serve",
        description="vLLM's OpenAI-compatible server with per-request declared k "
        "(MoE-PHDS). All vLLM serve flags apply. With no model: the bundled tiny OLMoE on CPU.",
    )
    parser = make_arg_parser(parser)
    add_phds_args(parser)
    return parser


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def parse_args(argv: list[str]) -> argparse.Namespace:
    """vLLM's parse, plus our defaults: the bundled model's when no model was named,
    the CPU-safe ones on a CPU platform. Defaults never override a flag the user gave."""
    from phds_serve.server.bundled_model import BUNDLED_DEFAULTS, CPU_SAFE_DEFAULTS, bundled_model_path

    parser = build_parser()
    parser.set_defaults(model=_NO_MODEL)
    args = parser.parse_args(argv)
    # vLLM's default (0) aborts in-flight requests on SIGTERM: each one fails with an EngineDeadError
    # traceback. Drain them instead, for up to this long (--shutdown-timeout 0 restores vLLM's).
    defaults: dict[str, Any] = {"shutdown_timeout": SHUTDOWN_TIMEOUT_S}
    if on_cpu():
        defaults.update(CPU_SAFE_DEFAULTS)
    if args.model_tag is None and args.model == _NO_MODEL:
        defaults.update(model=str(bundled_model_path()), **CPU_SAFE_DEFAULTS, **BUNDLED_DEFAULTS)
    if defaults:
        parser.set_defaults(**defaults)
        args = parser.parse_args(argv)
    if args.model_tag is not None:
        args.model = args.model_tag
    return args


def _hf_config(args: argparse.Namespace) -> Any | None:
    """The model's HF config with the user's hf_overrides, for the startup check."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(
            args.model,
            trust_remote_code=bool(getattr(args, "trust_remote_code", False)),
            revision=getattr(args, "revision", None),
        )
    except Exception as exc:  # exotic formats: the middleware checks again at first request
        logger.warning("phds-serve: could not pre-check the model config (%s)", exc)
        return None
    if isinstance(args.hf_overrides, dict):
        for key, value in args.hf_overrides.items():
            setattr(config, key, value)
    return config


def finalize(args: argparse.Namespace) -> None:
    """Validate our options against the model and wire the layer into vLLM's args.

    The engine's k contract does not exist yet here; the layer checks the
    options against it again when the server starts (and refuses to start)."""
    from phds_serve.server.layer_config import precheck

    if args.phds_max_k is not None:
        overrides = args.hf_overrides if isinstance(args.hf_overrides, dict) else {}
        args.hf_overrides = {**overrides, "phds_max_k": args.phds_max_k}
    if getattr(args, "phds_require_api_key", False):
        from phds_serve.server.trust import parse_key_tiers

        keys = list(parse_key_tiers(args.phds_api_key_tiers))  # TierConfigError is a ValueError
        if not keys:
            raise ValueError("--require-api-key needs --api-key-tiers (the keys it accepts)")
        args.api_key = [*(args.api_key or []), *(k for k in keys if k not in (args.api_key or []))]
    hf_config = _hf_config(args)
    if hf_config is not None:
        precheck(args, hf_config)  # raises ValueError with the reason
    if MIDDLEWARE not in args.middleware:
        args.middleware = [*args.middleware, MIDDLEWARE]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    ensure_multiproc_dir()
    ensure_rpc_dir()

    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args

    cli_env_setup()
    args = parse_args(argv)
    configure_logging_from_args(args)
    try:
        finalize(args)
    except ValueError as exc:
        sys.exit(f"phds-serve: {exc}")
    command = ServeSubcommand()
    command.validate(args)
    command.cmd(args)


if __name__ == "__main__":
    main()
