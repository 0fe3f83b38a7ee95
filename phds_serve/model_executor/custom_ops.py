"""The one ``phds`` torch library: host-side declared-k steps that torch.compile must
see as opaque ops (their grouping by k depends on data)."""

from __future__ import annotations

from typing import Callable

from torch.library import Library
from vllm.utils.torch_utils import direct_register_custom_op

PHDS_LIB = Library("phds", "FRAGMENT")


def register_op(name: str, func: Callable, fake: Callable) -> None:
    """``torch.ops.phds.<name>``, through vLLM's registration helper."""
    direct_register_custom_op(op_name=name, op_func=func, fake_impl=fake, target_lib=PHDS_LIB)
