"""phds_serve.model_executor:register: the plugin activates through its vLLM entry point, and PHDS_DISABLE
switches it off."""

from __future__ import annotations

PLUGIN_PROBE = """
from vllm.plugins import load_general_plugins
from vllm.model_executor.models import ModelRegistry
load_general_plugins()
cls = ModelRegistry._try_load_model_cls("OlmoeForCausalLM")
print(cls.__module__ + "." + cls.__name__)
"""


def test_plugin_activates_through_entry_point_and_switches_off():
    import os
    import subprocess
    import sys
    from importlib.metadata import entry_points

    names = {ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert "phds_serve.model_executor:register" in names

    def loaded_class(disable: str) -> str:
        env = dict(os.environ, PHDS_DISABLE=disable)
        out = subprocess.run([sys.executable, "-c", PLUGIN_PROBE], env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.strip().splitlines()[-1]

    assert loaded_class("0").endswith("models.olmoe.DeclaredKOlmoeForCausalLM")
    assert loaded_class("1") == "vllm.model_executor.models.olmoe.OlmoeForCausalLM"
