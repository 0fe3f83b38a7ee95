from collections import Counter

import pytest

from phds_serve.train.schedule import KSchedule


def test_phds_mixes_then_anchors():
    s = KSchedule("phds", (1, 2, 3, 4), 1000, anchor_k=2, anchor_frac=0.06, seed=3)
    ks = s.steps()
    assert len(ks) == 1000
    assert s.anchor_steps == 60
    assert set(ks[-60:]) == {2}
    mix = Counter(ks[:940])
    assert set(mix) == {1, 2, 3, 4}
    # uniform draw: each k near 940/4 = 235 (binomial sd ~13)
    assert all(abs(c - 235) < 60 for c in mix.values()), mix


def test_phds_is_deterministic_by_seed():
    a = KSchedule("phds", (2, 3, 4), 200, anchor_k=3, seed=1).steps()
    assert a == KSchedule("phds", (2, 3, 4), 200, anchor_k=3, seed=1).steps()
    assert a != KSchedule("phds", (2, 3, 4), 200, anchor_k=3, seed=2).steps()


def test_oracle_is_fixed_k():
    s = KSchedule("oracle", (3,), 50)
    assert set(s.steps()) == {3} and s.anchor_steps == 0
    assert s.describe() == "Oracle3"


def test_no_anchor():
    s = KSchedule("phds", (1, 4), 100, anchor_k=None)
    assert s.anchor_steps == 0 and set(s.steps()) <= {1, 4}


@pytest.mark.parametrize("bad", [dict(mode="x", k_train=(1,)), dict(mode="phds", k_train=()),
                                 dict(mode="oracle", k_train=(1, 2)), dict(mode="phds", k_train=(0, 1))])
def test_rejects_bad_settings(bad):
    with pytest.raises(ValueError):
        KSchedule(total_steps=10, **bad)


def test_describe_and_dict():
    s = KSchedule("phds", (2, 3, 4), 10, anchor_k=3)
    assert s.describe() == "PHDS [2,3,4]->3"
    assert s.to_dict()["recipe"] == "PHDS [2,3,4]->3" and "_ks" not in s.to_dict()
