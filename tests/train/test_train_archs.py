"""A few PHDS steps on a tiny random MoE of each architecture: schedule, loss, checkpoint."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from phds_serve.train.checkpoint import read_phds, save_checkpoint
from phds_serve.train.data import load_documents, pack_blocks
from phds_serve.train.routing import current_k
from phds_serve.train.schedule import KSchedule
from phds_serve.train.trainer import TrainSettings, train

from .phds_tiny_models import ARCHS, tiny_model

STEPS = 12


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.fixture(scope="module")
def blocks(corpus_dir, tokenizer):
    return pack_blocks(load_documents([corpus_dir]), tokenizer, 64)[:32]


@pytest.mark.parametrize("arch", ARCHS)
def test_phds_steps_schedule_loss_and_checkpoint(arch, blocks, tokenizer, tmp_path):
    model = tiny_model(arch, len(tokenizer))
    sched = KSchedule("phds", (1, 2, 3, 4), STEPS, anchor_k=1, anchor_frac=0.25, seed=0)
    settings = TrainSettings(output_dir=str(tmp_path / "t"), max_steps=STEPS, lr=5e-3, batch_size=4,
                             logging_steps=1, progress=False, warmup_ratio=0.0)
    callback, trainer = train(model, blocks, sched, settings)

    # the k applied per step is the recipe: mixed k, then the low-k anchor
    assert callback.history == list(sched.steps())
    assert callback.history[-3:] == [1, 1, 1]
    assert len(set(callback.history[:9])) >= 2
    logged = [h["k"] for h in trainer.state.log_history if "loss" in h]
    assert logged == callback.history
    losses = _losses(trainer)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3, losses
    assert model.config.router_aux_loss_coef == 0.0
    assert current_k(model) == 4  # back at native k after training

    out = save_checkpoint(model, tokenizer, tmp_path / "ckpt", sched.to_dict(), "# card\n")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_experts_per_tok == 4
    assert read_phds(out)["recipe"] == "PHDS [1,2,3,4]->1"
    assert (out / "README.md").exists() and (out / "tokenizer.json").exists()
    ids = blocks[:1, :16]
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(ids).logits, model.eval()(ids).logits)


def test_oracle_and_mask_mode(blocks, tokenizer, tmp_path):
    model = tiny_model("olmoe", len(tokenizer))
    sched = KSchedule("oracle", (2,), 4)
    settings = TrainSettings(output_dir=str(tmp_path / "t"), max_steps=4, lr=5e-3, batch_size=4,
                             logging_steps=1, progress=False, routing="mask")
    callback, trainer = train(model, blocks, sched, settings)
    assert callback.history == [2] * 4
    assert current_k(model) == 4
    assert not any(hasattr(r, "phds_k") for r in model.modules())  # mask removed before saving
    json.dumps(sched.to_dict())
