"""The bundled model's data pipeline: the recursive stdlib tree, its manifest, bytes per token, resume."""

import hashlib

import torch
from transformers import TrainerCallback

from phds_serve.eval.bundled import read_manifest, spread, token_bytes, write_manifest
from phds_serve.train.data import is_heldout, load_tree, manifest
from phds_serve.train.schedule import KSchedule
from phds_serve.train.trainer import TrainSettings, train
from .phds_tiny_models import tiny_train_config


def _tree(root):
    files = {
        "a.py": "x = 1\n", "pkg/__init__.py": "", "pkg/sub/__init__.py": "y = 2\n",
        "site-packages/numpy/__init__.py": "import numpy\n", "pkg/__pycache__/a.py": "z\n",
        "_sysconfigdata__linux.py": "BUILD = '/home/builder'\n", "config-3.11-x86_64/x.py": "p\n",
        "notes.txt": "not python\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_load_tree_is_recursive_named_by_path_and_skips_machine_specific_files(tmp_path):
    _tree(tmp_path)
    names = [d.name for d in load_tree(tmp_path)]
    assert names == ["a.py", "pkg/__init__.py", "pkg/sub/__init__.py"]


def test_manifest_records_split_and_hash_and_round_trips(tmp_path):
    _tree(tmp_path)
    docs = load_tree(tmp_path)
    rows = manifest(docs, 0.5)
    for d, r in zip(docs, rows):
        assert r["split"] == ("heldout" if is_heldout(d.name, 0.5) else "train")
        assert r["sha256"] == hashlib.sha256(d.text.encode()).hexdigest() and r["bytes"] == len(d.text.encode())
    write_manifest(rows, tmp_path / "m.tsv")
    assert [{**r, "bytes": int(r["bytes"])} for r in read_manifest(tmp_path / "m.tsv")] == rows


def test_token_bytes_adds_up_to_the_utf8_text(tokenizer):
    text = "def f(x):\n    return x  # caf\u00e9 \u2192 \u00fc\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    table = token_bytes(tokenizer)
    assert int(table[ids].sum()) == len(text.encode("utf-8"))
    assert int(table[tokenizer.eos_token_id]) == 0


def test_spread_takes_blocks_from_the_whole_range():
    blocks = torch.arange(100).view(100, 1)
    picked = spread(blocks, 5).flatten().tolist()
    assert picked[0] == 0 and picked[-1] == 99 and len(set(picked)) == 5
    assert spread(blocks, 0).shape[0] == 100


def test_resumed_training_continues_from_its_checkpoint(tmp_path, tokenizer):
    """A run stopped after its step-3 checkpoint and resumed runs steps 3..5 only, at the schedule's k,
    starting from the checkpoint's weights, experts included (Trainer alone leaves the fused experts
    of transformers 5 at their initial values)."""
    from transformers import AutoModelForCausalLM

    blocks = torch.randint(3, len(tokenizer), (24, 32), generator=torch.Generator().manual_seed(0))
    cfg = tiny_train_config("olmoe", len(tokenizer))
    sched = KSchedule("phds", (1, 2, 4), 6, anchor_k=1, seed=0)
    seen = {}

    class StopAt3(TrainerCallback):  # an interrupted run: stops right after its step-3 checkpoint
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 3

    class FirstWeights(TrainerCallback):  # the weights the resumed run starts its first step from
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            seen.setdefault("sd", {k: v.clone() for k, v in model.state_dict().items()})

    def run(callbacks=(), resume=None, seed=0):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        s = TrainSettings(output_dir=str(tmp_path), max_steps=6, lr=3e-3, batch_size=4, seed=0, progress=False,
                          extra_args=dict(save_strategy="steps", save_steps=3))
        cb, trainer = train(model, blocks, sched, s, callbacks, resume_from_checkpoint=resume)
        return model, cb.history, trainer.state.global_step

    stopped, hist, step = run([StopAt3()])
    assert step == 3 and hist == list(sched.steps()[:3]) and (tmp_path / "checkpoint-3").is_dir()
    at3 = {k: v.clone() for k, v in stopped.state_dict().items()}
    resumed, hist, step = run([FirstWeights()], resume=str(tmp_path / "checkpoint-3"), seed=1)
    assert step == 6 and hist == list(sched.steps()[3:])
    assert any(".experts." in k for k in at3)
    for k, v in at3.items():
        assert torch.equal(seen["sd"][k], v), k
