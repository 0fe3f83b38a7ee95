"""Tier policy: parsing (inline and YAML), startup checks, k precedence, binding."""

from __future__ import annotations

import pytest

from phds_serve.tiers import (
    Tier,
    TierBindingError,
    TierConfigError,
    TierRequestError,
    check_tiers,
    load_tiers,
    parse_tier_spec,
    parse_tier_yaml,
    resolve,
)

SPEC = "fast=1:priority=-10,balanced=2,quality=4"


def test_inline_spec_with_priorities():
    table = parse_tier_spec(SPEC)
    assert table.tiers == {
        "fast": Tier("fast", 1, -10),
        "balanced": Tier("balanced", 2, None),
        "quality": Tier("quality", 4, None),
    }
    assert table.names() == ["fast", "balanced", "quality"]
    assert table.has_priorities()
    assert table.as_json()["fast"] == {"k": 1, "priority": -10}


def test_yaml_forms_equal_inline(tmp_path):
    nested = "tiers:\n  fast: {k: 1, priority: -10}\n  balanced: 2\n  quality:\n    k: 4\n"
    flat = "fast: {k: 1, priority: -10}\nbalanced: {k: 2}\nquality: 4\n"
    listed = "tiers:\n- {name: fast, k: 1, priority: -10}\n- {name: balanced, k: 2}\n- {name: quality, k: 4}\n"
    for text in (nested, flat, listed):
        assert parse_tier_yaml(text) == parse_tier_spec(SPEC)
    path = tmp_path / "tiers.yaml"
    path.write_text(nested)
    assert load_tiers(str(path)) == parse_tier_spec(SPEC)
    assert not load_tiers(None)


@pytest.mark.parametrize(
    "spec",
    ["fast", "fast=", "fast=one", "fast=1.5", "fast=0", "fast=-1", "fast=1,fast=2",
     "fast=1:prio=3", "fast=1:priority=x", "bad name=1", ","],
)
def test_bad_inline_specs(spec):
    with pytest.raises(TierConfigError):
        parse_tier_spec(spec)


@pytest.mark.parametrize(
    "text", ["[]", "fast: {priority: 1}", "fast: {k: 1, q: 2}", "fast: true", "- {k: 1}", "3"]
)
def test_bad_yaml(text):
    with pytest.raises(TierConfigError):
        parse_tier_yaml(text)


def test_missing_yaml_file_is_a_config_error(tmp_path):
    with pytest.raises(TierConfigError, match="cannot read"):
        load_tiers(str(tmp_path / "nope.yaml"))


def test_check_tiers_against_model_range():
    table = parse_tier_spec(SPEC)
    check_tiers(table, range(1, 5))
    with pytest.raises(TierConfigError, match="quality.*outside"):
        check_tiers(table, range(1, 3))


TABLE = parse_tier_spec(SPEC)


@pytest.mark.parametrize(
    "explicit, tier, default, want_k, want_source",
    [
        (3, "fast", 2, 3, "request"),   # explicit k beats the tier ...
        (None, "fast", 2, 1, "tier"),   # ... the tier beats --default-k ...
        (None, None, 2, 2, "default"),  # ... which beats the native k
        (None, None, None, 4, "native"),
        (None, "  ", None, 4, "native"),  # an empty header names no tier
        (None, "QUALITY", None, 4, "tier"),  # tier names are case-insensitive
    ],
)
def test_precedence(explicit, tier, default, want_k, want_source):
    res = resolve(explicit, tier, TABLE, native_k=4, default_k=default)
    assert (res.k, res.source) == (want_k, want_source)


def test_tier_priority_applies_even_with_explicit_k():
    assert resolve(2, "fast", TABLE, native_k=4).priority == -10
    assert resolve(None, "balanced", TABLE, native_k=4).priority is None
    assert resolve(None, None, TABLE, native_k=4).priority is None


def test_unknown_tier_names_the_configured_ones():
    with pytest.raises(TierRequestError, match="unknown tier 'turbo'.*fast \\(k=1\\).*quality \\(k=4\\)"):
        resolve(None, "turbo", TABLE, native_k=4)
    with pytest.raises(TierRequestError, match="no tiers are configured"):
        resolve(None, "fast", load_tiers(None), native_k=4)


def test_binding_tiers_are_ceilings():
    assert resolve(1, "balanced", TABLE, native_k=4, binding=True).k == 1
    assert resolve(2, "balanced", TABLE, native_k=4, binding=True).k == 2
    with pytest.raises(TierBindingError, match="k=3 exceeds tier 'balanced'.*1 to 2"):
        resolve(3, "balanced", TABLE, native_k=4, binding=True)
    # Not binding: the explicit k simply wins.
    assert resolve(3, "balanced", TABLE, native_k=4, binding=False).k == 3
    # Binding without a tier header: nothing to bind to.
    assert resolve(4, None, TABLE, native_k=4, binding=True).k == 4


# -- ranges (elastic tiers) -----------------------------------------------------------------
def test_ranges_inline_and_yaml_agree():
    inline = parse_tier_spec("fast=1,balanced=4..2,quality=8..6:priority=-1")
    assert inline.tiers["balanced"] == Tier("balanced", 4, None, 2)
    assert inline.tiers["quality"] == Tier("quality", 8, -1, 6) and inline.tiers["fast"].lowest_k == 1
    for text in ('fast: 1\nbalanced: "4..2"\nquality: {k: 8, min_k: 6, priority: -1}\n',
                 'tiers:\n  fast: {k: 1}\n  balanced: {k: "4..2"}\n  quality: {k: "8..6", priority: -1}\n'):
        assert parse_tier_yaml(text) == inline
    assert inline.max_rungs() == 2 and inline.has_ranges() and not parse_tier_spec(SPEC).has_ranges()
    assert inline.as_json()["balanced"] == {"k": 4, "min_k": 2} and inline.as_json()["fast"] == {"k": 1}
    assert "balanced (k=4..2)" in inline.describe()


@pytest.mark.parametrize("spec", ["b=2..4", "b=4..0", "b=4..", "b=..2", "b=4...2", "b=a..2"])
def test_bad_ranges(spec):
    with pytest.raises(TierConfigError):
        parse_tier_spec(spec)


def test_bad_range_yaml():
    for text in ('b: {k: "4..2", min_k: 2}', "b: {k: 2, min_k: 3}", "b: {k: 2, min_k: 0}"):
        with pytest.raises(TierConfigError):
            parse_tier_yaml(text)


def test_check_tiers_checks_both_ends_of_a_range():
    check_tiers(parse_tier_spec("b=4..2"), range(1, 5))
    with pytest.raises(TierConfigError, match="k=1, outside the model's allowed k 2..4"):
        check_tiers(parse_tier_spec("b=4..1"), [2, 3, 4])
    with pytest.raises(TierConfigError, match=r"outside the model.s allowed k 4 only \(no reason\)"):
        check_tiers(parse_tier_spec("b=4..3"), [4], "no reason")


def test_brownout_level_lowers_only_a_tiers_k_within_its_range():
    table = parse_tier_spec("fast=1,balanced=4..2,quality=8..6")
    for level, want in ((0, 4), (1, 3), (2, 2), (3, 2), (10, 2)):
        res = resolve(None, "balanced", table, native_k=8, level=level)
        assert (res.k, res.nominal_k, res.browned_out) == (want, 4, want < 4)
    assert resolve(None, "quality", table, native_k=8, level=5).k == 6
    assert resolve(None, "fast", table, native_k=8, level=5).k == 1  # a fixed tier stays put
    # Explicit k, --default-k and the native k are never lowered.
    assert resolve(3, "balanced", table, native_k=8, level=2).k == 3
    assert resolve(None, None, table, native_k=8, default_k=5, level=2).k == 5
    assert resolve(None, None, table, native_k=8, level=2).k == 8
    # Binding tiers bind to the nominal k, not the browned-out one.
    assert resolve(4, "balanced", table, native_k=8, binding=True, level=2).k == 4
