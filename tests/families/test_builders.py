"""Tiny checkpoints of every MoE family (phds_serve.tiny.FAMILIES): transformers only, no engines."""

from __future__ import annotations

import pytest
import torch

from phds_serve import tiny

FAMILIES = list(tiny.FAMILIES)
NATIVE = {"phimoe": 2}  # PhiMoE's router is top-2 only
# transformers' PhiMoE always routes top-2 (sparsemixer) whatever k says.
K_IGNORED = {"phimoe"}
# transformers' LongCat MoE forward fails at k=1 (a transformers bug).
K1_BROKEN = {"longcat_flash"}
# DeepSeek-V4's hash table (tid2eid) is [vocab, k]: a checkpoint loads at its own k only.
K_FIXED = {"deepseek_v4"}


def native(name: str) -> int:
    return NATIVE.get(name, 4)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = tiny.build_family_checkpoint(name, root / name, seed=0, native_k=native(name))
        return cache[name]

    return get


def _ids(n: int = 9) -> torch.Tensor:
    return torch.randint(2, 512, (1, n), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", FAMILIES)
def test_checkpoint_loads_and_k_round_trips(name, checkpoints):
    fam = tiny.FAMILIES[name]
    path = checkpoints(name)
    model = tiny.reference_model(name, path)
    assert model.config.architectures == [fam.hf_arch]
    assert fam.k_of(model.config) == native(name)
    if name in K_FIXED:
        with pytest.raises(Exception):
            tiny.reference_model(name, path, 2)
        return
    k = 1 if name not in K1_BROKEN else 2
    at_k = tiny.reference_model(name, path, k)
    assert fam.k_of(at_k.config) == k
    # What vLLM is given sets the same attribute on the saved config.
    config = tiny.reference_config(name, path)
    overrides = tiny.hf_overrides(name, k)
    key, value = next(iter(overrides.items()))
    if isinstance(value, dict):  # nested (DBRX ffn_config): vLLM updates the sub-config
        for sub, v in value.items():
            setattr(getattr(config, key), sub, v)
    else:
        config.update(overrides)
    assert fam.k_of(config) == k
    with torch.no_grad():
        a, b = model(_ids()).logits, at_k(_ids()).logits
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    if name not in K_IGNORED:
        gap = (a - b).abs().max() / a.abs().max()
        assert gap > 1e-2, "k does not change transformers' output"


@pytest.mark.parametrize("name", FAMILIES)
def test_router_is_sharp_and_bias_is_set(name, checkpoints):
    fam = tiny.FAMILIES[name]
    model = tiny.reference_model(name, checkpoints(name))
    tensors = model.state_dict()
    routers = [t for n, t in tensors.items() if n.endswith(fam.router) and t.dim() == 2]
    assert routers, "no router weight found"
    for w in routers:
        assert 0.08 < float(w.float().std()) < 0.3  # N(0, 0.02) x router_scale 8
    if fam.bias:
        biases = [t for n, t in tensors.items() if n.endswith(fam.bias)]
        assert biases and all(float(b.abs().max()) > 0 for b in biases)


@pytest.mark.parametrize("name", [n for n in FAMILIES if tiny.FAMILIES[n].neutralise_attention])
def test_attention_neutralised_for_mla_families(name, checkpoints):
    fam = tiny.FAMILIES[name]
    tensors = tiny.reference_model(name, checkpoints(name)).state_dict()
    outs = [t for n, t in tensors.items() if n.endswith(fam.attn_out)]
    assert outs and all(float(t.abs().max()) == 0 for t in outs)


def test_neutralise_attention_on_request(tmp_path):
    fam = tiny.FAMILIES["glm4_moe"]
    path = tiny.build_family_checkpoint("glm4_moe", tmp_path / "g", neutralise_attention=True)
    tensors = tiny.reference_model("glm4_moe", path).state_dict()
    outs = [t for n, t in tensors.items() if n.endswith(fam.attn_out)]
    assert len(outs) == 2 and all(float(t.abs().max()) == 0 for t in outs)


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_original_archs_are_built_as_before(arch, tmp_path):
    """FAMILIES' entries of the four original architectures are build_tiny_checkpoint itself."""
    from safetensors.torch import load_file

    a = tiny.build_tiny_checkpoint(arch, tmp_path / "a", seed=0)
    b = tiny.build_family_checkpoint(arch, tmp_path / "b", seed=0)
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[n], tb[n]) for n in ta)
    import json

    assert json.loads((a / "config.json").read_text())["architectures"] == [tiny.FAMILIES[arch].hf_arch]


def test_hf_overrides_nested_for_dbrx():
    assert tiny.hf_overrides("dbrx", 2) == {"ffn_config": {"moe_top_k": 2}}
    assert tiny.hf_overrides("ernie4_5_moe", 2) == {"moe_k": 2}
