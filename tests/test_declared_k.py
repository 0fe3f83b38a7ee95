"""phds_serve.declared_k: what a request's k may be (parse_k, KPolicy, KContract)."""

from __future__ import annotations

import pytest

from phds_serve.declared_k import InvalidK, KContract, KPolicy, parse_k
from phds_serve.tiny import ARCHS, family_config


@pytest.mark.parametrize("bad", [True, False, 2.0, 2.5, "2", None, [2]])
def test_parse_k_accepts_only_integers(bad):
    with pytest.raises(InvalidK, match="k must be an integer"):
        parse_k(bad)


def test_policy_range_and_messages():
    policy = KPolicy(native_k=4, num_experts=8)
    contract = KContract(policy, declared=True)
    assert list(policy.allowed) == [1, 2, 3, 4]
    assert contract.resolve(None) == 4 and contract.resolve({}) == 4
    assert contract.resolve({"k": 2}) == 2
    for bad in (0, -1, 5):
        with pytest.raises(InvalidK, match=r"k=-?\d is not allowed; k must be an integer from 1 to 4 \(native k 4, 8 experts\)"):
            contract.validate(bad)
    with pytest.raises(InvalidK):
        contract.resolve({"k": None})
    wide = KContract(KPolicy(native_k=4, num_experts=8, max_k=8), declared=True)
    assert wide.validate(8) == 8
    undeclared = KContract(policy, declared=False, reason="why")
    assert undeclared.validate(4) == 4
    with pytest.raises(InvalidK, match=r"k=2 is not available; this model serves only its native k 4"):
        undeclared.validate(2)
    with pytest.raises(ValueError, match="number of experts"):
        KPolicy(native_k=4, num_experts=8, max_k=9)


@pytest.mark.parametrize("arch", ARCHS)
def test_policy_from_each_architecture_config(arch):
    config = family_config(arch, num_experts=8, native_k=4)
    assert KPolicy.from_hf_config(config) == KPolicy(native_k=4, num_experts=8, max_k=4)
    config.phds_max_k = 6  # what vLLM's hf_overrides={"phds_max_k": 6} sets
    assert KPolicy.from_hf_config(config).max_k == 6
