"""What the DNS checks of ``relayd check-config --dns`` share: the result row, the resolvers, the lookups.

A lookup that finds nothing (NXDOMAIN, no record of the type) is an empty answer; any other DNS failure
raises ``dns.exception.DNSException`` for the check to turn into a failed row (relayd.cli.doctor).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

from relayd.config import parse_hostport

__all__ = [
    "LIFETIME",
    "Check",
    "CheckName",
    "IPAddress",
    "Resolvers",
    "addresses",
    "dns_error",
    "make_resolvers",
    "tag_list",
    "txt_records",
    "warn",
]

CheckName = Literal["SPF", "DKIM", "DMARC", "DMARC-RUA", "MX", "MTA-STS", "TLS-RPT"]

#: Seconds allowed for one DNS question (all retries). Short: an operator waits for the answer.
LIFETIME = 5.0

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the report: ``what`` was checked for ``domain``, whether it is right, and why not."""

    domain: str
    what: CheckName
    ok: bool
    detail: str
    #: a recommendation not followed (shown as WARN): not a fault, so ``ok`` stays True
    warning: bool = False


def warn(domain: str, what: CheckName, detail: str) -> Check:
    """A recommendation not followed: shown as WARN, not a failure."""
    return Check(domain, what, True, detail, warning=True)


# --- resolvers -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Resolvers:
    """The async resolver for our own lookups and a blocking one for pyspf (it runs in a thread)."""

    async_: dns.asyncresolver.Resolver
    sync: dns.resolver.Resolver


def make_resolvers(nameservers: Sequence[str]) -> Resolvers:
    """Resolvers asking ``nameservers`` ("host:port", port 53 if left out), or the system's if empty.

    Each nameserver keeps its own port (``Do53Nameserver``), unlike the single ``Resolver.port``.
    Raises ``ValueError`` for a bad "host:port" and ``dns.resolver.NoResolverConfiguration`` when the
    system has no resolver configured; :func:`run_checks` turns both into failed checks.
    """
    a = dns.asyncresolver.Resolver(configure=not nameservers)
    s = dns.resolver.Resolver(configure=not nameservers)
    if nameservers:
        servers: list[str | dns.nameserver.Nameserver] = []
        for spec in nameservers:
            host, port = parse_hostport(spec, 53)
            servers.append(dns.nameserver.Do53Nameserver(host, port))
        a.nameservers = servers
        s.nameservers = servers
    for r in (a, s):
        r.lifetime = LIFETIME
        r.timeout = LIFETIME / 2
    return Resolvers(a, s)


def dns_error(exc: BaseException) -> str:
    """A short, operator-readable text for a failed lookup."""
    if isinstance(exc, dns.resolver.NXDOMAIN):
        return "no such domain (NXDOMAIN)"
    if isinstance(exc, dns.resolver.NoAnswer):
        return "no record of that type"
    if isinstance(exc, dns.exception.Timeout):
        return f"DNS timeout ({exc})"
    return str(exc) or type(exc).__name__


async def txt_records(res: dns.asyncresolver.Resolver, name: str) -> list[str]:
    """The TXT records at ``name``, each one's strings joined (RFC 7208 §3.3, RFC 6376 §3.6.2.2).

    An absent name or type is an empty list; any other DNS failure raises ``dns.exception.DNSException``.
    Records are decoded as UTF-8 with replacement: a garbled record should show up as a mismatch, not a crash.
    """
    try:
        answer = await res.resolve(name, "TXT")
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]


async def addresses(res: dns.asyncresolver.Resolver, host: str) -> set[IPAddress]:
    """The A and AAAA addresses of ``host`` (empty if it has none); other DNS failures raise."""

    async def one(rdtype: str) -> set[IPAddress]:
        try:
            answer = await res.resolve(host, rdtype)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return set()
        return {ipaddress.ip_address(r.address) for r in answer}

    v4, v6 = await asyncio.gather(one("A"), one("AAAA"))
    return v4 | v6


def tag_list(record: str) -> dict[str, str]:
    """A DKIM/DMARC tag-list (RFC 6376 §3.2) as a dict; later duplicates lose, as most verifiers do."""
    tags: dict[str, str] = {}
    for part in record.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            tags.setdefault(name.strip(), value.strip())
    return tags
