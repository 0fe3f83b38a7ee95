"""phds-train end to end from a config (pretrain mode) on a directory of .py files, then phds-eval."""

import json

from phds_serve.eval.cli import main as eval_main
from phds_serve.train.checkpoint import read_phds
from phds_serve.train.cli import main as train_main, parse_ks
from phds_serve.train.data import is_heldout, load_documents, split_documents
from .phds_tiny_models import tiny_train_config


def test_parse_ks():
    assert parse_ks("1-4") == (1, 2, 3, 4) and parse_ks("2,4") == (2, 4)


def test_split_is_by_document_and_deterministic(corpus_dir):
    docs = load_documents([corpus_dir])
    train, held = split_documents(docs, 0.4)
    assert {d.name for d in train}.isdisjoint(d.name for d in held)
    assert len(train) + len(held) == len(docs)
    assert [is_heldout(d.name, 0.4) for d in docs] == [is_heldout(d.name, 0.4) for d in docs]


def test_jsonl_formats(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    rows = [{"text": "x = 1"}, {"prompt": "def f():", "completion": " pass"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    texts = [d.text for d in load_documents([path], tokenizer=tokenizer)]
    assert texts == ["x = 1", "def f(): pass", "<|user|>\nhi\n<|assistant|>\nyo\n"]


def test_train_from_config_then_eval(corpus_dir, tokenizer, tmp_path, capsys):
    cfg_dir, tok_dir, out = tmp_path / "cfg", tmp_path / "tok", tmp_path / "out"
    tiny_train_config("olmoe", len(tokenizer)).save_pretrained(cfg_dir)
    tokenizer.save_pretrained(tok_dir)
    rc = train_main(["--from-config", str(cfg_dir), "--tokenizer", str(tok_dir), "--data", str(corpus_dir),
                     "--output", str(out), "--mode", "phds", "--k-train", "1-4", "--anchor-k", "1",
                     "--anchor-frac", "0.34", "--steps", "6", "--block-size", "64", "--batch-size", "4",
                     "--lr", "3e-3", "--heldout-frac", "0.2", "--no-progress"])
    assert rc == 0
    phds = read_phds(out)
    assert phds["recipe"] == "PHDS [1,2,3,4]->1" and phds["total_steps"] == 6
    assert phds["k_history_counts"].get("1", 0) >= 2 and sum(phds["k_history_counts"].values()) == 6
    assert "PHDS [1,2,3,4]->1" in (out / "README.md").read_text()
    assert json.loads((out / "config.json").read_text())["num_experts_per_tok"] == 4

    ev = tmp_path / "eval"
    assert eval_main(["--checkpoint", str(out), "--data", str(corpus_dir), "--heldout-frac", "0",
                      "--block-size", "64", "--out", str(ev)]) == 0
    res = json.loads((ev / "results.json").read_text())
    assert res["ks"] == [1, 2, 3, 4] and res["rows"][-1]["agreement_with_reference"] == 1.0
    assert "agree@4" in capsys.readouterr().out
