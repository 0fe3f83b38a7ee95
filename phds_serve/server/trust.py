"""Who may choose a tier: the gateway (shared secret or trusted address) or an API key.

A tier carries a k and a scheduling priority, so a tier header is a claim to
resources. It is honoured only when the request proves it came through the
gateway: it carries the gateway's shared secret (``--tier-secret``, compared
in constant time), or it comes from a trusted proxy address
(``--trusted-proxies``). With neither configured, only loopback clients are
trusted (a local gateway or a developer). Deployments without a gateway map
API keys to tiers (``--api-key-tiers``). An untrusted tier header is an
HTTP 400 (``--untrusted-tier reject``, the default) or dropped
(``--untrusted-tier ignore``); it is never silently honoured. Pure: unit-tested
without a server.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from dataclasses import dataclass, field
from typing import Mapping

from phds_serve.server.errors import RequestRejected
from phds_serve.tiers import TierConfigError, TierTable

LOOPBACK = ("127.0.0.0/8", "::1/128")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(spec: str | None) -> tuple[Network, ...]:
    """``10.0.0.0/8, 192.168.1.7`` -> networks; a bare address is a /32 (or /128)."""
    out = []
    for item in filter(None, (part.strip() for part in (spec or "").split(","))):
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise TierConfigError(f"--trusted-proxies: {item!r} is not an IP address or network") from None
    return tuple(out)


def parse_key_tiers(spec: str | None) -> dict[str, str]:
    """``KEY=tier,KEY2=tier2`` or a YAML file ``{keys: {KEY: tier}}`` -> {key: tier}."""
    if not spec:
        return {}
    if os.path.isfile(spec) or spec.endswith((".yaml", ".yml")):
        import yaml

        try:
            with open(spec, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except OSError as exc:
            raise TierConfigError(f"cannot read API-key tier file {spec!r}: {exc}") from None
        if isinstance(data, Mapping) and "keys" in data:
            data = data["keys"]
        if not isinstance(data, Mapping) or not data:
            raise TierConfigError("the API-key tier file must map keys to tier names ({keys: {KEY: tier}})")
        pairs = [(str(k), v) for k, v in data.items()]
    else:
        pairs = []
        for item in filter(None, (part.strip() for part in spec.split(","))):
            key, eq, tier = item.rpartition("=")
            if not eq or not key or not tier:
                raise TierConfigError(f"--api-key-tiers: {item!r} must look like KEY=tier")
            pairs.append((key.strip(), tier))
    out: dict[str, str] = {}
    for key, tier in pairs:
        if not isinstance(tier, str) or not tier.strip():
            raise TierConfigError(f"--api-key-tiers: the tier of a key must be a tier name, got {tier!r}")
        if key in out:
            raise TierConfigError("--api-key-tiers: a key is listed twice")
        out[key] = tier.strip().lower()
    return out


@dataclass(frozen=True)
class TrustConfig:
    secret: str | None = None
    secret_header: str = "x-phds-gateway-secret"
    proxies: tuple[Network, ...] = ()
    key_tiers: Mapping[str, str] = field(default_factory=dict)
    untrusted: str = "reject"  # "reject" | "ignore"

    def __post_init__(self) -> None:
        if self.untrusted not in ("reject", "ignore"):
            raise TierConfigError(f"--untrusted-tier must be reject or ignore, got {self.untrusted!r}")
        if self.secret is not None and len(self.secret) < 16:
            raise TierConfigError("--tier-secret must be at least 16 characters")

    @property
    def trusted_networks(self) -> tuple[Network, ...]:
        """The configured proxies; loopback only when no secret and no proxies are configured."""
        if self.proxies or self.secret:
            return self.proxies
        return tuple(ipaddress.ip_network(n) for n in LOOPBACK)

    def check(self, tiers: TierTable) -> None:
        """Startup check: every mapped key names a configured tier."""
        for tier in set(self.key_tiers.values()):
            if tier not in tiers.tiers:
                raise TierConfigError(f"--api-key-tiers maps a key to tier {tier!r}; {tiers.describe()}")

    def describe(self) -> dict[str, object]:
        return {
            "gateway_secret": self.secret is not None,
            "trusted_proxies": [str(n) for n in self.trusted_networks],
            "api_key_tiers": len(self.key_tiers),
            "untrusted_tier": self.untrusted,
        }


@dataclass(frozen=True)
class TierClaim:
    """The tier a request may use, and how it was established."""

    name: str | None
    source: str  # "gateway-secret" | "trusted-proxy" | "api-key" | "none" | "ignored"


def _trusted_address(host: str | None, networks: tuple[Network, ...]) -> bool:
    if not host:
        return False
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks)


def bearer_key(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def claim_tier(
    header_value: str | None,
    secret_value: str | None,
    client_host: str | None,
    authorization: str | None,
    trust: TrustConfig,
    tier_header: str = "x-phds-tier",
) -> TierClaim:
    """Decide which tier (if any) this request may use; RequestRejected for an untrusted header."""
    named = header_value if header_value and header_value.strip() else None
    if named is not None:
        if trust.secret is not None and secret_value is not None and hmac.compare_digest(
            secret_value.encode(), trust.secret.encode()
        ):
            return TierClaim(named, "gateway-secret")
        if _trusted_address(client_host, trust.trusted_networks):
            return TierClaim(named, "trusted-proxy")
        if trust.untrusted == "reject":
            raise RequestRejected(
                f"the {tier_header} header is accepted only from the gateway "
                "(its shared secret or a trusted proxy address); this request has neither. "
                "Send the request through the gateway, or use an API key mapped to a tier.",
                tier_header,
            )
    key = bearer_key(authorization)
    if key is not None:
        for known, tier in trust.key_tiers.items():
            if hmac.compare_digest(known.encode(), key.encode()):
                return TierClaim(tier, "api-key")
    return TierClaim(None, "ignored" if named is not None else "none")
