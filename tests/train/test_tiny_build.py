"""`make tiny-model`'s build, end to end on a small tree: recipe guard, resume from the saved base,
bfloat16 storage, and a card whose numbers are those of the saved weights."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import phds_serve
from phds_serve.eval.bundled import MANIFEST, evaluate_bpb, manifest_documents, spread, token_bytes
from phds_serve.train import tiny
from phds_serve.train.data import pack_blocks

ROOT = Path(phds_serve.__file__).parent
ARGS = ["--root", str(ROOT), "--vocab", "300", "--hidden-size", "16", "--intermediate-size", "16", "--layers", "1",
        "--heads", "2", "--pretrain-steps", "6", "--warmup-steps", "1", "--decay-steps", "2", "--phds-steps", "4",
        "--batch-size", "2", "--save-steps", "3", "--eval-blocks", "2", "--save-dtype", "bfloat16"]


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    work, out = tmp_path_factory.mktemp("work"), tmp_path_factory.mktemp("out") / "model"
    assert tiny.main(["--work", str(work), "--out", str(out), *ARGS]) == 0
    return work, out


def test_build_writes_a_bf16_model_with_card_samples_and_manifest(build):
    _, out = build
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(n).dtype for n in f.keys()} == {torch.bfloat16}
    config = json.loads((out / "config.json").read_text())
    assert config["phds"]["storage_dtype"] == "bfloat16" and config["phds"]["base"]["arch"]["hidden_size"] == 16
    card = (out / "README.md").read_text()
    for prompt in tiny.PROMPTS:
        for k in range(1, 5):
            assert f"Greedy completion at k={k} of `{prompt!r}`" in card
    assert [r["k"] for r in json.loads((out / "eval.json").read_text())] == [1, 2, 3, 4]
    assert (out / MANIFEST).is_file()


def test_card_numbers_are_those_of_the_saved_weights(build):
    """The build evaluates the rounded weights: a float32 load of the saved file gives the same loss."""
    _, out = build
    rows = {r["k"]: r for r in json.loads((out / "eval.json").read_text())}
    tok = AutoTokenizer.from_pretrained(str(out))
    blocks = spread(pack_blocks(manifest_documents(out / MANIFEST, ROOT), tok, tiny.BLOCK_SIZE), 2)
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    for k in (1, 4):
        row, _ = evaluate_bpb(model, blocks, token_bytes(tok), k)
        assert row.loss == pytest.approx(rows[k]["loss"], rel=1e-6)


def test_rerun_reuses_the_base_and_another_recipe_is_refused(build, tmp_path):
    work, _ = build
    base = (work / "base" / "model.safetensors").stat().st_mtime_ns
    assert tiny.main(["--work", str(work), "--out", str(tmp_path / "again"), *ARGS]) == 0
    assert (work / "base" / "model.safetensors").stat().st_mtime_ns == base  # PHDS again, no pretraining
    with pytest.raises(SystemExit, match="another recipe"):
        tiny.main(["--work", str(work), "--out", str(tmp_path / "other"), *ARGS, "--hidden-size", "32"])
