"""The bundled tiny model: phds-eval on it, held-out discipline, bits per byte per k, and
Python-looking completions."""

import csv
import io
import json
import platform
import tokenize

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from phds_serve.bundled_assets import ASSET_DIR
from phds_serve.eval.bundled import MANIFEST, evaluate_checkpoint, read_manifest
from phds_serve.eval.cli import main as eval_main
from phds_serve.server.bundled_model import BUNDLED_DEFAULTS
from phds_serve.train.checkpoint import read_phds
from phds_serve.train.data import is_heldout

ASSET = ASSET_DIR

pytestmark = pytest.mark.skipif(not (ASSET / "config.json").exists(), reason="bundled model not built")


@pytest.fixture(scope="module")
def eval_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    assert eval_main(["--checkpoint", str(ASSET), "--ks", "1,2,4", "--max-blocks", "16",
                      "--out", str(out)]) == 0
    return out


def test_phds_eval_writes_per_k_results(eval_out, capsys):
    payload = json.loads((eval_out / "results.json").read_text())
    assert payload["ks"] == [1, 2, 4] and payload["reference_k"] == 4
    rows = {r["k"]: r for r in payload["rows"]}
    assert rows[4]["agreement_with_reference"] == 1.0
    assert all(payload["agreement"]["matrix"][i][i] == 1.0 for i in range(3))
    assert rows[1]["agreement_with_reference"] < 1.0
    with (eval_out / "results.csv").open() as fh:
        assert [int(r["k"]) for r in csv.DictReader(fh)] == [1, 2, 4]
    assert (eval_out / "results.png").stat().st_size > 1000


def test_k1_loss_within_15_percent_of_native(eval_out):
    rows = {r["k"]: r for r in json.loads((eval_out / "results.json").read_text())["rows"]}
    assert rows[1]["loss"] <= 1.15 * rows[4]["loss"], rows
    assert rows[4]["loss"] < 6.0  # learned context (uniform over 4096 tokens is 8.3, unigram ~6.7)


# Issue 18's targets. Committed model: 1.16 bits/byte at k=4 and 1.23 at k=1 on all 752 held-out blocks
# (docs/RESULTS.md); the one before it had 1.87 (0.23 epoch), the one before that 2.27.
MAX_NATIVE_BPB = 1.6
MAX_K1_RATIO = 1.10


def _same_python_as_the_build() -> bool:
    return read_phds(ASSET)["data"]["python"] == platform.python_version()


def test_heldout_files_were_not_trained_on():
    """The manifest's split is the path-hash rule, the two sets are disjoint, and both are large."""
    phds = read_phds(ASSET)
    rows = read_manifest(ASSET / MANIFEST)
    frac = phds["data"]["heldout_frac"]
    assert all(r["split"] == ("heldout" if is_heldout(r["name"], frac) else "train") for r in rows)
    train = {r["name"] for r in rows if r["split"] == "train"}
    held = {r["name"] for r in rows if r["split"] == "heldout"}
    assert not train & held and len(held) >= 50 and len(train) >= 1000
    assert any("/" in n for n in train)  # the tree, recursively: not only top-level modules


def test_served_at_the_context_it_was_trained_on():
    config = json.loads((ASSET / "config.json").read_text())
    assert config["max_position_embeddings"] == read_phds(ASSET)["block_size"] == BUNDLED_DEFAULTS["max_model_len"]


def test_weights_fit_in_20_mib():
    assert (ASSET / "model.safetensors").stat().st_size <= 20 * 2**20


@pytest.mark.skipif(not _same_python_as_the_build(), reason="held-out files are those of the build's Python")
def test_heldout_bits_per_byte_at_every_k():
    res = evaluate_checkpoint(ASSET, [1, 2, 3, 4], max_blocks=24)
    bpb = {r["k"]: r["bits_per_byte"] for r in res["rows"]}
    assert res["evaluated_blocks"] == 24 and res["heldout_files"] >= 50
    assert bpb[4] <= MAX_NATIVE_BPB, bpb
    assert bpb[1] / bpb[4] <= MAX_K1_RATIO, bpb
    assert bpb[1] > bpb[4], bpb  # k really changes the model


def _python_tokens(text: str) -> list[tokenize.TokenInfo]:
    toks = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            toks.append(tok)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass  # a cut-off completion may end mid-statement
    return toks


@pytest.mark.parametrize("k", [1, 4])
def test_greedy_completion_looks_like_python(k):
    """A body after a signature: indented lines that Python's own tokenizer reads without an error token
    (a docstring cut off at the end reads as nothing, so the indentation is the check that always bites).
    (Whether a reader finds it plausible is judged in the card, not here: the lines repeat.)"""
    config_kwargs = {"num_experts_per_tok": k}
    model = AutoModelForCausalLM.from_pretrained(ASSET, dtype=torch.float32, **config_kwargs).eval()
    tok = AutoTokenizer.from_pretrained(ASSET)
    # Ending at the colon: the tokenizer keeps the newline and the next line's indentation in one token
    # ("\n   " + " return"), so a prompt ending in "\n" or spaces forces a split never seen in training.
    prompt = "import os\n\n\ndef main(args):"
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    body = [line for line in text.split("\n")[1:-1] if line.strip()]  # the last line may be cut mid-token
    assert text.startswith("\n") and len(body) >= 3, text
    assert all(line.startswith("    ") for line in body), text  # the def's body, not top-level text
    toks = [t for t in _python_tokens(prompt + text) if t.start[0] > prompt.count("\n") + 1]
    assert not [t for t in toks if t.type == tokenize.ERRORTOKEN and not t.string.isspace()], text
