"""Tier trust (pure): who may pick a tier, from which header, address or API key."""

from __future__ import annotations

import pytest

from phds_serve.server.errors import RequestRejected
from phds_serve.server.trust import TrustConfig, claim_tier, parse_key_tiers, parse_networks
from phds_serve.tiers import TierConfigError, parse_tier_spec

SECRET = "0123456789abcdef"


def claim(trust, tier="fast", secret=None, host="203.0.113.9", auth=None):
    return claim_tier(tier, secret, host, auth, trust)


def test_default_trusts_loopback_only():
    trust = TrustConfig()
    assert claim(trust, host="127.0.0.1").name == "fast"
    assert claim(trust, host="::1").source == "trusted-proxy"
    assert claim(trust, host="::ffff:127.0.0.1").name == "fast"  # IPv4-mapped loopback
    for host in ("203.0.113.9", "testclient", None, ""):
        with pytest.raises(RequestRejected, match="only from the gateway") as info:
            claim(trust, host=host)
        assert info.value.param == "x-phds-tier"


def test_secret_in_constant_time_and_no_loopback_once_configured():
    trust = TrustConfig(secret=SECRET)
    assert claim(trust, secret=SECRET) == claim(trust, secret=SECRET, host=None)
    assert claim(trust, secret=SECRET).source == "gateway-secret"
    for wrong in (None, "", SECRET[:-1], SECRET + "x"):
        with pytest.raises(RequestRejected):
            claim(trust, secret=wrong)
    with pytest.raises(RequestRejected):
        claim(trust, host="127.0.0.1")  # a secret is configured: loopback alone is not enough


def test_trusted_networks():
    trust = TrustConfig(proxies=parse_networks("10.0.0.0/8, 192.168.1.7, fd00::/8"))
    assert claim(trust, host="10.2.3.4").name == "fast" and claim(trust, host="192.168.1.7").name == "fast"
    assert claim(trust, host="fd00::1").name == "fast"
    with pytest.raises(RequestRejected):
        claim(trust, host="192.168.1.8")
    with pytest.raises(TierConfigError):
        parse_networks("10.0.0.0/8,nonsense")


def test_ignore_mode_and_api_keys():
    trust = TrustConfig(untrusted="ignore", key_tiers={"k-fast": "fast"})
    assert claim(trust) .name is None and claim(trust).source == "ignored"
    assert claim(trust, tier=None, auth="Bearer k-fast").name == "fast"
    assert claim(trust, tier="quality", auth="Bearer k-fast").source == "api-key"  # untrusted header dropped
    assert claim(trust, tier=None, auth="Bearer other").name is None
    assert claim(trust, tier=None, auth="Basic k-fast").name is None
    # A trusted gateway header wins over the key's own tier.
    gw = TrustConfig(secret=SECRET, key_tiers={"k-fast": "fast"})
    assert claim(gw, tier="quality", secret=SECRET, auth="Bearer k-fast").name == "quality"
    # Reject mode: an untrusted header is an error even with a mapped key.
    with pytest.raises(RequestRejected):
        claim(TrustConfig(key_tiers={"k": "fast"}), tier="quality", auth="Bearer k")


def test_key_tier_parsing_and_checks(tmp_path):
    assert parse_key_tiers("a=fast, b=Quality") == {"a": "fast", "b": "quality"}
    assert parse_key_tiers("sk-x=y=fast") == {"sk-x=y": "fast"}  # keys may hold '=' (base64)
    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n  abc: fast\n  def: quality\n")
    assert parse_key_tiers(str(path)) == {"abc": "fast", "def": "quality"}
    for bad in ("a", "=fast", "a=", "a=fast,a=quality"):
        with pytest.raises(TierConfigError):
            parse_key_tiers(bad)
    TrustConfig(key_tiers={"a": "fast"}).check(parse_tier_spec("fast=1"))
    with pytest.raises(TierConfigError, match="tier 'turbo'"):
        TrustConfig(key_tiers={"a": "turbo"}).check(parse_tier_spec("fast=1"))
    with pytest.raises(TierConfigError):
        TrustConfig(untrusted="maybe")
    with pytest.raises(TierConfigError, match="16"):
        TrustConfig(secret="short")
