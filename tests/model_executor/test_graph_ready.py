"""CUDA-graph readiness of the V2 declared-k forward, shown without a GPU.

A CUDA graph replays the kernels it captured, at the addresses it captured, with
no Python in between. So the forward a GPU deployment runs must

* read no tensor data on the host (a read syncs, and fails under capture): here
  every tensor is on the ``meta`` device, where any host read raises, and the
  forward is traced by ``make_fx``;
* trace as one graph (``torch.compile(fullgraph=True)`` raises on a graph break);
* take each step's k from the model state's persistent token-k buffer, at one
  address for real steps, dummy runs and capture alike, padding at k = 0.

The Triton kernels cannot launch on meta tensors, so their launches are recorded
instead; vLLM's modular kernel is a stand-in that records the ids it is handed.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from vllm.config import VllmConfig
from vllm.forward_context import set_forward_context

from phds_serve.declared_k import KPolicy
from phds_serve.kernels import align, fused_moe, router
from phds_serve.model_executor import v2_state
from phds_serve.model_executor.layers.declared_k_moe import DeclaredKMoERunner
from phds_serve.model_executor.step_k import STEP_REAL_INPUT, TOKEN_K_INPUT, StepPlan, publish_plan
from phds_serve.routing import RoutingRule

T, H, I, E, MAX_K = 24, 64, 32, 16, 4
RULES = {
    "softmax": RoutingRule(renormalize=True),
    # DeepSeek-V3's rule: sigmoid, correction bias, 4 groups keep 2 by top-2 sum, x2.5
    "grouped-sigmoid": RoutingRule("sigmoid", True, 1e-20, torch.empty(E, device="meta"), 4, 2, "top2_sum", 2.5),
}
KERNELS = {
    fused_moe: ("decode_w13_act_kernel", "decode_w2_sum_kernel", "grouped_w13_act_kernel",
                "grouped_w2_kernel", "masked_slot_sum_kernel"),
    align: ("count_pairs_kernel", "block_layout_kernel", "scatter_pairs_kernel"),
    router: ("declared_k_router_kernel",),
}


def meta(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


@pytest.fixture
def launches(monkeypatch) -> list[str]:
    """Every Triton launch by name; a grid that is not plain ints (read from data) fails."""
    recorded: list[str] = []

    class Launch:
        def __init__(self, name: str) -> None:
            self.name = name

        def __getitem__(self, grid):
            assert all(isinstance(g, int) for g in grid), (self.name, grid)

            def launch(*args, **kwargs) -> None:
                recorded.append(self.name)

            return launch

    for module, names in KERNELS.items():
        for name in names:
            monkeypatch.setattr(module, name, Launch(name))
    return recorded


def gpu_layer(backend: str, rule: RoutingRule, handed: list[torch.Tensor]):
    """The state a declared-k MoE runner's GPU branches read, with its kernels as stand-ins."""

    def forward_modular(x, topk_weights, topk_ids):  # vLLM's modular kernel: records its ids
        handed.append(topk_ids)
        return x * topk_weights.sum(dim=1, keepdim=True).to(x.dtype)

    layer = types.SimpleNamespace(
        backend=backend, rule=rule, layer_name="model.layers.0.mlp.experts",
        k_policy=KPolicy(native_k=MAX_K, num_experts=E),
        moe_config=types.SimpleNamespace(activation=types.SimpleNamespace(value="silu")),
        routed_experts=types.SimpleNamespace(
            phds_standard_weights=(meta(E, 2 * I, H, dtype=torch.bfloat16), meta(E, H, I, dtype=torch.bfloat16)),
            forward_modular=forward_modular),
        _quant_method=types.SimpleNamespace(topk_indices_dtype=None),
    )
    layer.step_plan = lambda n, device: DeclaredKMoERunner.step_plan(layer, n, device)
    layer._run_experts = lambda *args: DeclaredKMoERunner._run_experts(layer, *args)
    return layer


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("backend", ["triton", "modular"])
def test_v2_forward_traces_as_one_graph_without_host_reads(backend, rule, launches):
    handed: list[torch.Tensor] = []
    layer = gpu_layer(backend, RULES[rule], handed)
    token_k = meta(T, dtype=torch.int32)  # the model state's buffer: no values to read

    def forward(x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        return DeclaredKMoERunner.declared_k_forward(layer, x, router_logits)

    x, logits = meta(T, H, dtype=torch.bfloat16), meta(T, E)
    with set_forward_context(None, VllmConfig()):
        # What the V2 model forward publishes before the compiled model runs.
        publish_plan(StepPlan(token_k=token_k, width=MAX_K, real=True))
        graph = make_fx(forward)(x, logits)  # raises on any host read of a meta tensor
        torch._dynamo.reset()
        compiled = torch.compile(forward, fullgraph=True, backend="eager")  # raises on a graph break
        out = compiled(x, logits)
    assert out.shape == (T, H) and out.device.type == "meta"
    ops = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert not any("_local_scalar_dense" in op or "nonzero" in op for op in ops), ops
    if backend == "triton":
        assert "declared_k_router_kernel" in launches and launches.count("declared_k_router_kernel") == 2
    else:
        # Full width, never a width read from the step's data: the same shape every step.
        assert handed and all(ids.shape == (T, MAX_K) for ids in handed)
        assert not launches


class StockState:
    """The part of vLLM's V2 model state that DeclaredKModelState builds on."""

    def __init__(self, vllm_config, model, encoder_cache, device) -> None:
        self.vllm_config, self.max_num_reqs, self.max_num_tokens = vllm_config, 4, 32

    def add_request(self, req_index, new_req_data) -> None:
        pass

    def prepare_inputs(self, input_batch, req_states) -> dict:
        return {}

    def prepare_dummy_inputs(self, num_reqs: int, num_tokens: int) -> dict:
        return {}


def test_token_k_buffer_keeps_its_address_and_pads_at_k0(monkeypatch):
    policy = KPolicy(native_k=4, num_experts=8, max_k=6)
    contract = types.SimpleNamespace(policy=policy, resolve=lambda extra: (extra or {}).get("k", policy.native_k))
    monkeypatch.setattr(v2_state, "contract_of", lambda cfg: contract)
    cfg = types.SimpleNamespace(compilation_config=types.SimpleNamespace(static_all_moe_layers=["a", "b"]))
    state = v2_state.with_declared_k(StockState)(cfg, types.SimpleNamespace(k_policy=policy), None, torch.device("cpu"))
    address = state.token_k.data_ptr()
    assert state.token_k.dtype == torch.int32  # what the router kernel reads: no cast in any layer
    for slot, k in ((0, 1), (1, 6), (2, None)):
        state.add_request(slot, types.SimpleNamespace(sampling_params=types.SimpleNamespace(
            extra_args=None if k is None else {"k": k})))

    # Capture: a view of the same buffer, whatever it holds.
    captured = state.prepare_dummy_inputs(num_reqs=2, num_tokens=16)
    assert captured[TOKEN_K_INPUT].data_ptr() == address and captured[STEP_REAL_INPUT] is False
    # A real step: rows 2, 0, 1 with 3, 1, 2 tokens, padded to 8 tokens.
    batch = types.SimpleNamespace(
        req_ids=["c", "a", "b"], num_reqs=3, num_tokens=6, num_tokens_after_padding=8,
        idx_mapping_np=np.array([2, 0, 1]), query_start_loc_np=np.array([0, 3, 4, 6]))
    real = state.prepare_inputs(batch, types.SimpleNamespace(req_id_to_index={"a": 0, "b": 1, "c": 2}))
    assert real[TOKEN_K_INPUT].data_ptr() == address and real[STEP_REAL_INPUT] is True
    assert real[TOKEN_K_INPUT].tolist() == [4, 4, 4, 1, 6, 6, 0, 0]  # padding routed to no expert
    # A dummy step (profiling, warm-up): the widest k, same buffer, not a real step.
    dummy = state.prepare_inputs(types.SimpleNamespace(
        req_ids=[], num_reqs=0, num_tokens=5, num_tokens_after_padding=5), types.SimpleNamespace(req_id_to_index={}))
    assert dummy[TOKEN_K_INPUT].data_ptr() == address and dummy[STEP_REAL_INPUT] is False
    assert dummy[TOKEN_K_INPUT].tolist() == [6] * 5
