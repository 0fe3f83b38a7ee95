"""Replication v2: the splits hold out whole files, the per-file sums equal metrics computed
another way, the bootstrap's intervals cover what they should, and a run resumes."""

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import phds_serve
from phds_serve.eval import replicate as rep
from phds_serve.eval.metrics import agreement, evaluate_k
from phds_serve.train.data import Document, is_heldout, pack_blocks, pack_blocks_with_files
from phds_serve.train.tiny import HELDOUT_FRAC
from phds_serve.train.tokenizer import train_tokenizer


def test_split_is_by_file_and_holds_out_the_bundled_models_files():
    docs = [Document(f"pkg/mod{i}.py", f"x = {i}\n") for i in range(2000)]
    parts = rep.split(docs)
    names = {k: {d.name for d in v} for k, v in parts.items()}
    assert sum(len(v) for v in names.values()) == 2000
    assert not (names["pretrain"] & names["sft"] or names["pretrain"] & names["heldout"] or names["sft"] & names["heldout"])
    assert names["heldout"] == {d.name for d in docs if is_heldout(d.name, HELDOUT_FRAC)}
    assert 60 <= len(names["heldout"]) <= 140 and 140 <= len(names["sft"]) <= 260


def test_pack_blocks_with_files_marks_each_token_with_its_file():
    docs = [Document("a.py", "def f():\n    return 1\n" * 5), Document("b.py", "import os\nprint(os.sep)\n" * 7)]
    tok = train_tokenizer([d.text for d in docs], 300)
    blocks, owner = pack_blocks_with_files(docs, tok, 8)
    assert torch.equal(blocks, pack_blocks(docs, tok, 8))
    flat, who = blocks.reshape(-1), owner.reshape(-1)
    first = tok(docs[0].text, add_special_tokens=False)["input_ids"]
    assert who[: len(first) + 1].eq(0).all() and flat[: len(first)].tolist() == first
    assert flat[len(first)] == tok.eos_token_id and who[len(first) + 1 :].eq(1).all()


def _sums(per_file: dict[str, list[float]]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, dtype=float) for k, v in per_file.items()}


def test_bootstrap_interval_is_zero_for_identical_metrics_and_excludes_zero_for_a_shift():
    rng = np.random.default_rng(1)
    tokens = rng.integers(50, 500, 40).astype(float)
    a = tokens * rng.uniform(0.4, 0.6, 40)
    sums = _sums({"tokens": tokens, "a|0": a, "b|0": a.copy(), "c|0": a + 0.05 * tokens,
                  "a|1": a * 1.01, "b|1": a * 1.01, "c|1": a * 1.01 + 0.05 * tokens})
    same = rep.bootstrap(sums, rep.diff(rep.ratio("a|{s}", "tokens"), rep.ratio("b|{s}", "tokens")), [0, 1], 300)
    assert same["estimate"] == 0 and same["ci95"] == [0, 0]
    shift = rep.bootstrap(sums, rep.diff(rep.ratio("c|{s}", "tokens"), rep.ratio("a|{s}", "tokens")), [0, 1], 300)
    assert shift["estimate"] == pytest.approx(0.05) and shift["ci95"][0] > 0.04


def test_bootstrap_interval_covers_zero_for_noise_and_widens_with_one_file():
    rng = np.random.default_rng(2)
    tokens = np.full(60, 100.0)
    noise = rng.normal(0, 5, 60)
    noise -= noise.mean()  # a zero-mean difference: the interval must cover 0
    sums = _sums({"tokens": tokens, "a|0": 50 + noise, "b|0": np.full(60, 50.0)})
    r = rep.bootstrap(sums, rep.diff(rep.ratio("a|{s}", "tokens"), rep.ratio("b|{s}", "tokens")), [0], 500)
    assert r["ci95"][0] < 0 < r["ci95"][1]
    one = np.full(60, 50.0)
    one[0] += 60 * 5  # the same mean shift, all from one file: the file resampling must show it
    spread = rep.bootstrap(_sums({"tokens": tokens, "a|0": one, "b|0": np.full(60, 50.0)}),
                           rep.diff(rep.ratio("a|{s}", "tokens"), rep.ratio("b|{s}", "tokens")), [0], 500)
    even = rep.bootstrap(_sums({"tokens": tokens, "a|0": np.full(60, 55.0), "b|0": np.full(60, 50.0)}),
                         rep.diff(rep.ratio("a|{s}", "tokens"), rep.ratio("b|{s}", "tokens")), [0], 500)
    assert spread["estimate"] == pytest.approx(even["estimate"])
    assert spread["ci95"][1] - spread["ci95"][0] > 10 * (even["ci95"][1] - even["ci95"][0])


MICRO = ["--seeds", "0,1", "--draws", "50", "--vocab", "300", "--hidden", "16", "--heads", "2", "--layers", "1",
         "--block", "64", "--batch", "2", "--pretrain-steps", "8", "--warmup-steps", "2", "--decay-steps", "2",
         "--ft-steps", "6", "--root", str(Path(phds_serve.__file__).parent)]


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("replication")
    assert rep.main(["--out", str(out), *MICRO]) == 0
    return out


def test_micro_replication_writes_its_report_and_resumes(micro_run):
    import json

    report = json.loads((micro_run / "replication.json").read_text())
    assert report["meta"]["heldout_files"] >= 1 and report["meta"]["seeds"] == [0, 1]
    assert {"loss phds-paper@2 - oracle2@2", "agree phds-paper(2,4) - oracles", "agree oracle4 seed pair @4",
            "tv phds-today(2,4)", "agree_wrong oracle4(2,4)"} <= set(report["rows"])
    assert (micro_run / "replication.png").stat().st_size > 1000
    assert rep.main(["--out", str(micro_run), *MICRO]) == 0  # resumed: nothing trained again
    assert "12 runs already saved, 0 to train" in (micro_run / "progress.log").read_text()
    with pytest.raises(SystemExit, match="another recipe"):
        rep.main(["--out", str(micro_run), *MICRO[:-2], "--ft-steps", "7", *MICRO[-2:]])


def test_per_file_sums_equal_metrics_computed_per_k(micro_run):
    """Loss and agreement from the per-file sums equal phds_serve.eval.metrics on the same blocks."""
    data = torch.load(micro_run / "data.pt")
    sums = dict(np.load(micro_run / "per_file.npz"))
    load = lambda tag: AutoModelForCausalLM.from_pretrained(str(micro_run / "models" / tag), dtype=torch.float32)  # noqa: E731
    phds, oracle2 = load("phds-paper-s1"), load("oracle2-s1")
    at2, at4 = evaluate_k(phds, data["heldout"], 2), evaluate_k(phds, data["heldout"], 4)
    o2 = evaluate_k(oracle2, data["heldout"], 2)
    tokens = sums["tokens"].sum()
    assert tokens == at2.tokens
    # The micro models are barely trained: near-tied logits, and the two paths batch differently, so an
    # argmax may flip at a tie (CI once saw one token of ~6,000 differ). Counts may differ by 2 tokens;
    # any misalignment or wrong pairing moves them by hundreds.
    ties = 2 / tokens
    assert sums["nll|phds-paper|1|2"].sum() / tokens == pytest.approx(at2.loss, rel=1e-5)
    assert sums["correct|phds-paper|1|4"].sum() / tokens == pytest.approx(at4.accuracy, abs=ties)
    assert (sums["agree|phds-paper|1|2|phds-paper|1|4"].sum() / tokens
            == pytest.approx(agreement(at2.predictions, at4.predictions), abs=ties))
    assert (sums["agree|oracle2|1|2|oracle4|1|4"].sum() / tokens
            == pytest.approx(agreement(o2.predictions, evaluate_k(load("oracle4-s1"), data["heldout"], 4).predictions),
                             abs=ties))
    target = data["heldout"][:, 1:].reshape(-1)
    wrong = (at2.predictions.reshape(-1) != target) | (at4.predictions.reshape(-1) != target)
    assert abs(sums["wrong|phds-paper|1|2|phds-paper|1|4"].sum() - wrong.sum().item()) <= 2
