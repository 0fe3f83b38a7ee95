"""The bundled model is stored in bfloat16 and served in float32: what the build evaluates and
samples (rounded in memory by ``round_to``) must be bit for bit what a float32 load of the file gives."""

import torch
from transformers import AutoModelForCausalLM

from phds_serve.train.checkpoint import save_checkpoint
from phds_serve.train.tiny import round_to
from .phds_tiny_models import tiny_model


def _reload_equals(model, path) -> bool:
    loaded = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    ours = dict(model.named_parameters())
    return all(torch.equal(p, ours[n]) for n, p in loaded.named_parameters())


def test_rounded_model_is_exactly_the_float32_load_of_its_bf16_file(tmp_path):
    model = tiny_model("olmoe", 300)
    round_to(model, torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # kept float32 in memory
    kept = {n: p.clone() for n, p in model.named_parameters()}
    save_checkpoint(model.float(), None, tmp_path / "m", {}, "card", dtype=torch.bfloat16)
    model.float()  # save_checkpoint cast it to bf16 for writing
    assert all(torch.equal(p, kept[n]) for n, p in model.named_parameters())
    assert _reload_equals(model, tmp_path / "m")


def test_without_rounding_the_evaluated_weights_differ_from_the_served_ones(tmp_path):
    model = tiny_model("olmoe", 300)
    before = {n: p.clone() for n, p in model.named_parameters()}
    save_checkpoint(model, None, tmp_path / "m", {}, "card", dtype=torch.bfloat16)
    model.float()
    for n, p in model.named_parameters():
        p.data.copy_(before[n])
    assert not _reload_equals(model, tmp_path / "m")
