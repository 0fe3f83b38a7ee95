"""``phds-serve``: ``vllm serve`` plus the declared-k layer.

All of vLLM's flags pass through (its own parser and its own ``serve``
command run the server); ours are added in one group. With no model given it
serves the bundled tiny OLMoE with CPU-sized defaults.

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
_NO_MODEL = "\0phds-no-model"


def ensure_multiproc_dir() -> str:
    """Turn on prometheus_client multiprocess mode (a fresh temp dir unless the user set one)."""
    existing = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if existing:
        os.makedirs(existing, exist_ok=True)
        return existing
    path = tempfile.mkdtemp(prefix="phds-prometheus-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    pid = os.getpid()
    # Only the process that created it removes it (spawned children run atexit too).
    atexit.register(lambda: os.getpid() == pid and shutil.rmtree(path, ignore_errors=True))
    return path


def add_phds_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "phds-serve (declared k)",
        "Per-request k: top-level \"k\" or vllm_xargs.k in the request; precedence "
        "explicit k > tier header > --default-k > native k.",
    )
    group.add_argument(
        "--tiers", dest="phds_tiers", default=None,
        help="Tier table: 'fast=1,balanced=2,quality=4' (optionally 'fast=1:priority=-10') "
        "or a YAML file path ({tiers: {fast: {k: 1, priority: -10}, quality: 4}}).",
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


def parse_args(argv: list[str]) -> argparse.Namespace:
    """vLLM's parse, plus the bundled-model defaults when no model was named."""
    parser = build_parser()
    parser.set_defaults(model=_NO_MODEL)
    args = parser.parse_args(argv)
    if args.model_tag is None and args.model == _NO_MODEL:
        from phds_serve.server.bundled_model import CPU_DEFAULTS, bundled_model_path

        parser.set_defaults(model=str(bundled_model_path()), **CPU_DEFAULTS)
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
    """Validate our options against the model and wire the layer into vLLM's args."""
    from phds_serve.server.layer_config import config_from

    if args.phds_max_k is not None:
        overrides = args.hf_overrides if isinstance(args.hf_overrides, dict) else {}
        args.hf_overrides = {**overrides, "phds_max_k": args.phds_max_k}
    hf_config = _hf_config(args)
    if hf_config is not None:
        config_from(args, hf_config)  # raises ValueError with the reason
    if MIDDLEWARE not in args.middleware:
        args.middleware = [*args.middleware, MIDDLEWARE]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    ensure_multiproc_dir()

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
