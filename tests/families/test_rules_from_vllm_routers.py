"""Families that vLLM CPU cannot run end to end still get their rule from the engine's
own code: vLLM builds the model for the family's config (dummy weights, no forward),
the plugin's MoE runners read the rule off the routers vLLM made
(``rule_from_router``), and that rule must equal the one that
tests/families/test_routing_rules.py shows equal to transformers' own routing at every k.

Built in one child process (vLLM's distributed state is per process). Not here:
Nemotron-H (vLLM CPU refuses its non-gated experts when the layer is built) and
Qwen3.5-MoE (vLLM CPU cannot inspect the architecture: its package needs
torchvision); their rules stay checked against transformers only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from phds_serve import tiny

from .test_routing_rules import FAMILIES_BY_NAME

# rules-test family -> (tiny family, config overrides, native k)
CASES = {
    "dbrx": ("dbrx", {}, 4),
    "jamba": ("jamba", {}, 4),
    "qwen3_next": ("qwen3_next", {}, 4),
    "lfm2_moe": ("lfm2_moe", {"use_expert_bias": True, "norm_topk_prob": True, "routed_scaling_factor": 1.7}, 4),
    "cohere2_moe_softmax": ("cohere2_moe", {"expert_selection_fn": "softmax"}, 4),
    "cohere2_moe_sigmoid": ("cohere2_moe", {"expert_selection_fn": "sigmoid", "norm_topk_prob": True}, 4),
    "llama4": ("llama4", {}, 1),  # weight on the expert input: declared at k = 1 only
}

CHILD = textwrap.dedent(
    """
    import importlib, json, sys, tempfile
    sys.path.insert(0, sys.argv[2])  # where the parent imported this module from
    fields = importlib.import_module(sys.argv[3]).fields  # the same fields() as the parent
    from vllm.config import set_current_vllm_config
    from vllm.distributed import (destroy_distributed_environment, destroy_model_parallel,
                                  init_distributed_environment, initialize_model_parallel)
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader.utils import initialize_model
    from phds_serve.model_executor.layers.declared_k_moe import DeclaredKMoERunner

    found = {}
    for name, path in json.loads(sys.argv[1]).items():
        vllm_config = EngineArgs(model=path, skip_tokenizer_init=True, load_format="dummy", dtype="float32",
                                 max_model_len=128, enforce_eager=True).create_engine_config()
        with set_current_vllm_config(vllm_config):
            init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                         distributed_init_method="file://" + tempfile.mktemp())
            initialize_model_parallel(1, 1)
            model = initialize_model(vllm_config=vllm_config)
            found[name] = [fields(m.rule) for m in model.modules()
                           if isinstance(m, DeclaredKMoERunner) and m.k_policy]
            del model
            destroy_model_parallel()
            destroy_distributed_environment()
    print(json.dumps(found))
    """
)


# Where vLLM's router itself differs from transformers (stock vLLM routes the same way):
# LFM2-MoE's transformers block divides by sum + 1e-6, vLLM's router by the sum alone. The
# weights differ by at most 1e-6 relative wherever the kept scores sum to 1 or more; the
# engine follows vLLM (docs/COMPATIBILITY.md).
VLLM_DIFFERS = {"lfm2_moe": {"renorm_eps": 0.0}}


def fields(rule) -> dict:
    grouped = rule.grouped  # one group keeping one is no grouping
    return dict(scoring=rule.scoring, renormalize=rule.renormalize, renorm_eps=rule.renorm_eps,
                num_groups=rule.num_groups if grouped else None, groups_kept=rule.groups_kept if grouped else None,
                group_score=rule.group_score if rule.grouped else None,
                routed_scaling_factor=rule.routed_scaling_factor, weight_on_input=rule.weight_on_input,
                bias=None if rule.correction_bias is None else list(rule.correction_bias.shape),
                expert_scale=rule.expert_scale is not None)


@pytest.fixture(scope="module")
def engine_rules(tmp_path_factory) -> dict[str, list[dict]]:
    root = tmp_path_factory.mktemp("vllm-routers")
    paths = {}
    for name, (family, overrides, native_k) in CASES.items():
        config = tiny.family_config(family, native_k=native_k, **overrides)
        config.save_pretrained(root / name)
        paths[name] = str(root / name)
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING")
    root = Path(__file__).resolve().parents[__name__.count(".")]  # sys.path entry of this module's package
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(paths), str(root), __name__], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(CASES))
def test_engine_rule_is_the_rule_transformers_routes_by(name, engine_rules):
    family, overrides, native_k = CASES[name]
    config = tiny.family_config(family, native_k=native_k, **overrides)
    rules_family = FAMILIES_BY_NAME[name]
    expected = {**fields(rules_family.rule(config, rules_family.block(config))), **VLLM_DIFFERS.get(name, {})}
    layers = engine_rules[name]
    assert layers, f"{name}: vLLM built no declared-k MoE layer"
    assert all(layer == expected for layer in layers), (name, layers, expected)
