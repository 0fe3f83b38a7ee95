"""CLI wiring: vLLM's parser with our flags, bundled-model defaults, startup checks."""

from __future__ import annotations

import pytest

from phds_serve.server import bundled_model, cli
from phds_serve.server.cli import MIDDLEWARE, finalize, parse_args


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A config-only OLMoE checkpoint dir: 8 experts, native k 4."""
    from phds_serve.tiny import family_config

    path = tmp_path_factory.mktemp("olmoe")
    config = family_config("olmoe", num_experts=8, native_k=4)
    config.save_pretrained(path)
    return str(path)


def test_vllm_flags_pass_through_and_ours_are_added(model_dir):
    args = parse_args([model_dir, "--max-num-seqs", "7", "--tiers", "fast=1", "--binding-tiers",
                       "--tier-header", "X-Tier", "--default-k", "2", "--max-k", "6",
                       "--hf-overrides", '{"foo": 1}'])
    assert args.model == model_dir and args.max_num_seqs == 7
    assert (args.phds_tiers, args.phds_binding_tiers, args.phds_default_k) == ("fast=1", True, 2)
    finalize(args)
    assert args.hf_overrides == {"foo": 1, "phds_max_k": 6}  # engine and server agree on the range
    assert args.middleware[-1] == MIDDLEWARE
    finalize(args)
    assert args.middleware.count(MIDDLEWARE) == 1


def test_no_model_serves_the_bundled_one_with_cpu_defaults(monkeypatch, tmp_path):
    monkeypatch.setattr(bundled_model, "bundled_model_path", lambda: tmp_path)
    args = parse_args(["--max-model-len", "256"])
    assert args.model == str(tmp_path)
    assert args.gpu_memory_utilization == 0.2 and args.enforce_eager and args.dtype == "float32"
    assert args.served_model_name == ["phds-tiny-olmoe"]
    assert args.max_model_len == 256  # a flag the user gave wins over our defaults
    assert args.port == 8000


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tiers", "quality=5"], "outside the model's allowed k"),
        (["--tiers", "quality=5", "--max-k", "9"], "must be between 1 and the number of experts"),
        (["--default-k", "0"], "--default-k 0"),
        (["--tiers", "fast=1:priority=-1"], "--scheduling-policy priority"),
        (["--tiers", "fast"], "name=k"),
        (["--tiers", "balanced=2..4"], "lowest k \\(4\\) must be from 1 to the nominal k \\(2\\)"),
        (["--tiers", "fast=1", "--slo-ttft-ms", "200"], "no tier has one"),
        (["--tiers", "b=4..2", "--slo-ttft-ms", "0"], "must be positive"),
        (["--tiers", "b=4..2", "--slo-ttft-ms", "200", "--slo-quantile", "1.5"],
         r"--slo-quantile must be in \(0, 1\], got 1.5"),
        (["--tiers", "b=4..2", "--slo-ttft-ms", "200", "--slo-quantile", "0"], r"--slo-quantile .* got 0.0"),
        (["--tiers", "fast=1", "--api-key-tiers", "k1=turbo"], "tier 'turbo'"),
        (["--tiers", "fast=1", "--tier-secret", "short"], "at least 16 characters"),
        (["--tiers", "fast=1", "--trusted-proxies", "10.0.0.0/33"], "not an IP address"),
    ],
)
def test_startup_checks(model_dir, flags, message):
    args = parse_args([model_dir, *flags])
    with pytest.raises(ValueError, match=message):
        finalize(args)


BROWNOUT_ON = ["--tiers", "balanced=4..2", "--slo-ttft-ms", "200"]


@pytest.mark.parametrize("flags", [
    ["--data-parallel-size", "2"],  # vLLM's default: two front ends, each balancing over both engines
    ["--data-parallel-size", "2", "--api-server-count", "1"],  # one front end over two engines
    ["--api-server-count", "2"],  # two front ends over one engine
    ["--data-parallel-size", "4", "--data-parallel-start-rank", "0", "--data-parallel-size-local", "2"],
])
def test_predictive_brownout_refuses_more_than_one_front_end_or_engine(model_dir, flags):
    """Its dispatch queue counts one engine's slots and only its own front end's requests: refused at start."""
    args = parse_args([model_dir, *BROWNOUT_ON, *flags])
    with pytest.raises(ValueError, match="needs one API-server process sending to one engine"):
        finalize(args)


@pytest.mark.parametrize("flags", [
    ["--data-parallel-size", "2", "--data-parallel-rank", "1"],  # one phds-serve per rank (external LB)
    ["--data-parallel-size", "2", "--data-parallel-external-lb", "--data-parallel-rank", "0"],
    ["--data-parallel-size", "2", "--brownout-mode", "reactive"],
    ["--api-server-count", "2", "--brownout-mode", "reactive"],
])
def test_one_engine_per_front_end_or_the_reactive_mode_starts(model_dir, flags):
    args = parse_args([model_dir, *BROWNOUT_ON, *flags])
    finalize(args)
    assert args.middleware[-1] == MIDDLEWARE


def test_tier_ranges_objectives_and_trust_flags_parse(model_dir):
    args = parse_args([model_dir, "--tiers", "fast=1,balanced=4..2", "--slo-ttft-ms", "250",
                       "--slo-itl-ms", "40", "--tier-secret", "x" * 16, "--trusted-proxies", "10.0.0.0/8",
                       "--api-key-tiers", "key1=fast", "--untrusted-tier", "ignore"])
    finalize(args)
    assert (args.phds_slo_ttft_ms, args.phds_slo_itl_ms, args.phds_untrusted_tier) == (250, 40, "ignore")


def test_predictive_flags_reach_the_controllers_settings(model_dir):
    from phds_serve.server.feedforward import ARRIVAL_QUANTILE
    from phds_serve.server.predictive import settings_from

    flags = ["--tiers", "balanced=4..2", "--slo-itl-ms", "40"]
    assert settings_from(parse_args([model_dir, *flags])).arrival_quantile == ARRIVAL_QUANTILE
    settings = settings_from(parse_args([model_dir, *flags, "--brownout-arrival-quantile", "0.75",
                                         "--brownout-headroom", "0.8", "--brownout-max-utilisation", "0.7"]))
    assert (settings.arrival_quantile, settings.headroom, settings.max_utilisation) == (0.75, 0.8, 0.7)
    assert settings_from(parse_args([model_dir, *flags])).onset_budget_k == float("inf")
    assert settings_from(parse_args([model_dir, *flags, "--brownout-onset-budget-k", "12"])).onset_budget_k == 12


def test_any_model_on_cpu_gets_the_cpu_safe_defaults_and_user_flags_win(model_dir, monkeypatch):
    monkeypatch.setattr(cli, "on_cpu", lambda: True)
    args = parse_args([model_dir])
    assert args.gpu_memory_utilization == 0.2 and args.enforce_eager
    assert args.max_model_len is None and args.served_model_name is None  # bundled-model settings stay off
    args = parse_args([model_dir, "--gpu-memory-utilization", "0.3"])
    assert args.gpu_memory_utilization == 0.3
    monkeypatch.setattr(cli, "on_cpu", lambda: False)
    args = parse_args([model_dir])
    assert args.gpu_memory_utilization == 0.92 and not args.enforce_eager  # vLLM's own defaults on a GPU


def test_max_k_widens_the_range(model_dir):
    finalize(parse_args([model_dir, "--tiers", "wide=6", "--max-k", "6"]))


def test_plugin_disabled_allows_only_the_native_k(model_dir, monkeypatch):
    monkeypatch.setenv("PHDS_DISABLE", "1")
    finalize(parse_args([model_dir, "--tiers", "native=4"]))
    for flags in (["--tiers", "fast=1"], ["--default-k", "2"], ["--max-k", "6"]):
        with pytest.raises(ValueError, match="declared k is unavailable|needs declared k"):
            finalize(parse_args([model_dir, *flags]))


def test_multiproc_dir_is_created_once(monkeypatch):
    # setenv (not delenv) so that monkeypatch restores the variable's absence afterwards:
    # a leaked path to the removed dir broke every later engine's prometheus_client.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")
    path = cli.ensure_multiproc_dir()
    assert cli.os.environ["PROMETHEUS_MULTIPROC_DIR"] == path and cli.os.path.isdir(path)
    assert cli.ensure_multiproc_dir() == path
    cli.os.rmdir(path)


def test_bundled_model_prefers_the_asset_else_builds_a_random_one(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    if (bundled_model.ASSET_DIR / "config.json").is_file():
        assert bundled_model.bundled_model_path() == bundled_model.ASSET_DIR
    monkeypatch.setattr(bundled_model, "ASSET_DIR", tmp_path / "no-asset")
    path = bundled_model.bundled_model_path()
    assert path == tmp_path / "cache" / "phds-serve" / bundled_model.FALLBACK_NAME
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert config.architectures == ["OlmoeForCausalLM"] and len(tok) <= config.vocab_size
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert bundled_model.bundled_model_path() == path  # cached: built once
