"""The model ``phds-serve`` serves when no ``--model`` is given.

Preferred: the trained tiny OLMoE committed under ``phds_serve/assets/tiny-olmoe``.
Without it (a checkout before the asset landed) a tiny random OLMoE with an
offline-trained tokenizer and a chat template is built once into the user's
cache, so ``phds-serve`` answers on a fresh install with no model hub.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from phds_serve.bundled_assets import ASSET_DIR

SERVED_NAME = "phds-tiny-olmoe"
FALLBACK_NAME = "tiny-olmoe-random-v3"
# Random init gives near-uniform next-token logits (greedy text flips on float
# noise) and experts too weak to change the output: sharpen the output layer
# and strengthen the experts so greedy text is stable and depends on k.
LM_HEAD_SCALE = 40.0
EXPERT_SCALE = 8.0

# On a CPU platform, for any model (applied only to flags the user did not set):
# vLLM's default memory fraction (0.92 of the NUMA node) fails whenever anything
# else holds memory, and graph compilation on CPU is slow for no gain here.
CPU_SAFE_DEFAULTS = dict(
    gpu_memory_utilization=0.2,
    enforce_eager=True,
)
# Plus, for the bundled tiny model: its context, its precision, its name.
BUNDLED_DEFAULTS = dict(
    max_model_len=512,
    dtype="float32",
    served_model_name=[SERVED_NAME],
)
CPU_DEFAULTS = {**CPU_SAFE_DEFAULTS, **BUNDLED_DEFAULTS}

def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "phds-serve"


def bundled_model_path() -> Path:
    """The asset if present, else the cached random fallback (built on first use)."""
    if (ASSET_DIR / "config.json").is_file():
        return ASSET_DIR
    path = cache_root() / FALLBACK_NAME
    if not (path / "tokenizer.json").is_file():
        build_random_model(path)
    return path


def _corpus() -> list[str]:
    import phds_serve.declared_k as dk
    import phds_serve.tiers as tiers

    texts = [Path(m.__file__).read_text(encoding="utf-8") for m in (dk, tiers)]
    return texts + ["Hello! How are you today? Tell me a story about experts and tokens."] * 4


def build_tokenizer(vocab_size: int = 512):
    """Byte-level BPE trained offline on a few package sources, with a chat template
    (the same recipe as the bundled model's tokenizer)."""
    from phds_serve.train.tokenizer import train_tokenizer

    return train_tokenizer(_corpus(), vocab_size)


def _sharpen(weights: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    for name, tensor in tensors.items():
        if name == "lm_head.weight":
            tensors[name] = tensor * LM_HEAD_SCALE
        elif ".experts." in name:
            tensors[name] = tensor * EXPERT_SCALE
    save_file(tensors, str(weights), metadata={"format": "pt"})


def build_random_model(path: Path) -> Path:
    """Tiny random OLMoE (8 experts, native k 4) plus tokenizer, written atomically."""
    from phds_serve.tiny import build_tiny_checkpoint

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        build_tiny_checkpoint("olmoe", tmp, seed=0)
        _sharpen(tmp / "model.safetensors")
        build_tokenizer().save_pretrained(str(tmp))
        try:
            tmp.rename(path)
        except OSError:  # another process won the race
            if not (path / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
