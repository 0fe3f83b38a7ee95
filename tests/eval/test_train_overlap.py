"""Held out by path is not unseen in content: the overlap measure finds near-copies."""

from phds_serve.eval.bundled import train_overlap
from phds_serve.train.data import Document

TABLE = "decoding_table = (\n" + "".join(f"    '\\x{i:02x}'  #  0x{i:02X} -> CHAR {i}\n" for i in range(64)) + ")\n"


def test_a_reformatted_copy_overlaps_fully_and_new_text_not_at_all():
    train = [Document("encodings/cp1.py", TABLE), Document("other.py", "def f(x):\n    return x + 1\n" * 3)]
    held = [Document("encodings/cp2.py", TABLE.replace("    ", "  ")),  # same words, other layout
            Document("new.py", " ".join(f"word{i}" for i in range(200)))]
    overlap = train_overlap(held, train)
    assert overlap["encodings/cp2.py"] == 1.0
    assert overlap["new.py"] == 0.0


def test_a_half_copied_file_overlaps_about_half():
    new = " ".join(f"fresh{i}" for i in range(400))
    copied = " ".join(f"seen{i}" for i in range(400))
    overlap = train_overlap([Document("half.py", copied + " " + new)], [Document("t.py", copied)])
    assert 0.45 < overlap["half.py"] < 0.55
