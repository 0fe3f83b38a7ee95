"""model_executor.step_k: the step plan (k per token from each batch row's k) and the token layout
it is expanded over, checked without an engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from phds_serve.declared_k import KContract, KPolicy


def test_step_plan_groups_tokens_by_row_k():
    from phds_serve.model_executor.step_k import RowK

    rows = RowK()
    rows.configure(KContract(KPolicy(native_k=4, num_experts=8), declared=True))
    for row, k in enumerate([1, 4, 2]):
        rows.set_row(row, k)
    rows.move_row(0, 2, swap=True)  # rows now declare 2, 4, 1
    plan = rows.plan([3, 2, 1], 7, torch.device("cpu"))  # one padding token, at k = 0
    assert plan.token_k.tolist() == [2, 2, 2, 4, 4, 1, 0]
    assert [(k, r.tolist()) for k, r in plan.groups] == [(0, [6]), (1, [5]), (2, [0, 1, 2]), (4, [3, 4])]
    assert plan.k_max == 4 and plan.width == 4 and plan.real
    # A step with requests in the batch but no token layout is refused, not run at native k ...
    with pytest.raises(RuntimeError, match="no token layout"):
        rows.plan(None, 5, torch.device("cpu"))
    # ... while a dummy run (warm-up, profiling: no requests) runs the widest k, so
    # that profiling measures the widest step (a widened range included).
    wide = RowK()
    wide.configure(KContract(KPolicy(native_k=4, num_experts=8, max_k=6), declared=True))
    dummy = wide.plan(None, 5, torch.device("cpu"))
    assert dummy.groups == [(6, None)] and not dummy.real


def test_step_plan_refuses_rows_it_does_not_know():
    """No silent native k: a batch row the logits processor never saw is an error."""
    from phds_serve.model_executor.step_k import RowK

    rows = RowK()
    rows.configure(KContract(KPolicy(native_k=4, num_experts=8), declared=True))
    rows.set_row(0, 2)
    with pytest.raises(RuntimeError, match=r"batch rows \[1\]"):
        rows.plan([1, 1], 2, torch.device("cpu"))


def test_token_k_follows_the_exact_token_layout():
    """Rows expand over query_start_loc, not per-row counts: a compacted layout (the
    second row scheduled 3 tokens but only 1 survives) keeps later rows in place."""
    from phds_serve.model_executor.step_k import expand_row_k

    row_k = np.array([2, 4, 1])
    out = expand_row_k(row_k, np.array([0, 3, 4, 6]), 8)
    assert out.tolist() == [2, 2, 2, 4, 1, 1, 0, 0]  # padding: k = 0, routed to no expert
    assert expand_row_k(np.array([3]), np.array([0, 0]), 2).tolist() == [0, 0]


def test_hybrid_models_take_the_layout_from_an_attention_layer():
    """Hybrid (Mamba + attention) steps: the first layer's metadata may be a Mamba
    layer's; the layout must come from a layer that has it, never default to native k
    (found by the family sweep: GraniteMoeHybrid ran k=1 requests at the native k)."""
    import types

    from vllm.config import VllmConfig
    from vllm.forward_context import set_forward_context

    from phds_serve.model_executor.step_k import RowK, tokens_per_row_from_forward_context

    mamba = types.SimpleNamespace(query_start_loc_d=torch.tensor([0, 1]),
                                  query_start_loc_p=torch.tensor([0, 3, 5]))
    attention = types.SimpleNamespace(query_start_loc=torch.tensor([0, 1, 4, 6]))
    with set_forward_context({"layers.0.mamba": mamba, "layers.1.attn": attention}, VllmConfig()):
        assert tokens_per_row_from_forward_context() == [1, 3, 2]
    with set_forward_context({"layers.0.mamba": mamba}, VllmConfig()):  # Mamba only
        assert tokens_per_row_from_forward_context() == [1, 3, 2]

    rows = RowK()
    rows.configure(KContract(KPolicy(native_k=4, num_experts=8), declared=True))
    assert not rows.plan(None, 3, torch.device("cpu")).real  # start-up dummy run: no rows
    rows.set_row(0, 1)
    with pytest.raises(RuntimeError, match="no token layout"):
        rows.plan(None, 3, torch.device("cpu"))
