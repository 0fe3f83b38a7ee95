"""The engine core's k tag on the prefix-cache key, on vLLM's own Request and block hasher."""

from __future__ import annotations

import pytest
from vllm import SamplingParams
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.request import Request

from phds_serve.declared_k import InvalidK, KContract, KPolicy
from phds_serve.model_executor.prefix_isolation import isolate_by_k, salt_for_k

BLOCK = 4
CONTRACT = KContract(KPolicy(native_k=4, num_experts=8), declared=True)


def _request(k, salt=None, tokens=tuple(range(2, 14))) -> Request:
    hash_fn = get_hash_fn_by_name("sha256")
    init_none_hash(hash_fn)
    params = SamplingParams(max_tokens=1, extra_args=None if k is None else {"k": k})
    request = Request("r", list(tokens), params, None, cache_salt=salt,
                      block_hasher=get_request_block_hasher(BLOCK, hash_fn))
    isolate_by_k(request, CONTRACT)
    return request


def test_blocks_are_keyed_by_k_and_client_salt():
    native, none, k1, k1_again = _request(4), _request(None), _request(1), _request(1)
    assert len(k1.block_hashes) == 3
    assert native.block_hashes == none.block_hashes  # no k is the native k
    assert k1.block_hashes == k1_again.block_hashes  # within a k: shared
    assert not set(k1.block_hashes) & set(native.block_hashes)  # across k: nothing
    assert _request(1, salt="a").block_hashes == _request(1, salt="a").block_hashes
    assert not set(_request(1, salt="a").block_hashes) & set(_request(1, salt="b").block_hashes)
    # No client salt reaches another k's blocks, not even the engine's own tag.
    forged = _request(4, salt=salt_for_k(None, 1))
    assert not set(forged.block_hashes) & set(k1.block_hashes)


def test_a_k_the_contract_does_not_allow_is_refused_in_the_engine():
    with pytest.raises(InvalidK):
        _request(9)
