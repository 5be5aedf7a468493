"""The checks of a sending domain: SPF for every address relayd sends it from, its DKIM key records, the
DMARC policy that applies to it and where its DMARC reports go."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from contextvars import ContextVar
from typing import Any

import dns.exception
import dns.resolver
import spf

from relayd.cli.doctor.lookups import LIFETIME, Check, Resolvers, dns_error, tag_list, txt_records
from relayd.config import DkimConfig
from relayd.mail.dkim import DkimKeyError, load_key

__all__ = ["check_dkim", "check_dmarc", "check_rua", "check_spf", "install_spf_lookup"]

#: Seconds allowed for one whole SPF evaluation (RFC 7208 §4.6.4 suggests at least 20).
_SPF_TIME = 20.0

_DMARC_RECORD = re.compile(r"^v\s*=\s*DMARC1\s*(;|$)")
_DMARC_POLICIES = frozenset({"none", "quarantine", "reject"})

# --- SPF through pyspf ---------------------------------------------------------------------------------

_SPF_RESOLVER: ContextVar[dns.resolver.Resolver | None] = ContextVar(
    "relayd_doctor_spf_resolver", default=None
)


def _spf_dns_lookup(name: str, qtype: str, strict: object = True, timeout: float = LIFETIME) -> list[Any]:
    """Drop-in for ``spf.DNSLookup``: the same result shape as pyspf's dnspython driver, asking our resolver.

    pyspf looks names up through its module-level ``DNSLookup`` and has no resolver parameter, so that
    function is replaced (once, see :func:`install_spf_lookup`). The resolver is taken from a context
    variable set by the thread running the check, so concurrent checks with different nameservers do not
    interfere; anyone else using pyspf in this process (no context set) gets the default resolver, as
    before. pyspf's own driver also calls ``dns.resolver.query``, deprecated since dnspython 2.0.
    Failures other than "no such name/record" become ``spf.TempError``, which pyspf reports as
    ``temperror``.
    """
    out: list[Any] = []
    try:
        resolver = _SPF_RESOLVER.get() or dns.resolver.get_default_resolver()
        answer = resolver.resolve(name, qtype, lifetime=min(float(timeout), LIFETIME))
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return out
    except dns.exception.DNSException as exc:
        raise spf.TempError(f"DNS {dns_error(exc)}") from exc
    for r in answer:
        if qtype in ("A", "AAAA"):
            out.append(((name, qtype), r.address))
        elif qtype == "MX":
            out.append(((name, qtype), (r.preference, r.exchange)))
        elif qtype == "PTR":
            out.append(((name, qtype), r.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            out.append(((name, qtype), r.strings))
    return out


def install_spf_lookup() -> None:
    if spf.DNSLookup is not _spf_dns_lookup:
        spf.DNSLookup = _spf_dns_lookup


async def _spf_result(res: Resolvers, ip: str, domain: str, helo: str) -> tuple[str, str]:
    """``(result, explanation)`` of pyspf's ``check2`` for MAIL FROM postmaster@domain from ``ip``.

    pyspf blocks, so it runs in a worker thread; ``to_thread`` copies the context, and the resolver is set
    in that copy only.
    """

    def run() -> tuple[str, str]:
        _SPF_RESOLVER.set(res.sync)
        try:
            result, explanation = spf.check2(i=ip, s=f"postmaster@{domain}", h=helo, querytime=_SPF_TIME)
        except ValueError:  # pyspf parses i= with ipaddress; a pool address that is not one lands here
            return "error", "not an IP address"
        return str(result), str(explanation)

    return await asyncio.to_thread(run)


async def check_spf(res: Resolvers, domain: str, sources: Sequence[tuple[str, str]]) -> Check:
    """SPF must ``pass`` for every (address, helo) relayd may send ``domain``'s mail from.

    ``softfail`` and ``neutral`` are failures here: receivers treat them as "not authorised" when they
    apply DMARC, and a bulk sender's mail does not survive that.
    """
    results = await asyncio.gather(*(_spf_result(res, ip, domain, helo) for ip, helo in sources))
    passed = [ip for (ip, _), (result, _) in zip(sources, results, strict=True) if result == "pass"]
    failed = [
        f"{result} for {ip}" + (f" ({explanation})" if explanation else "")
        for (ip, _), (result, explanation) in zip(sources, results, strict=True)
        if result != "pass"
    ]
    if failed:
        if all(result == "none" for result, _ in results):
            return Check(domain, "SPF", False, f"no SPF record at {domain}")
        return Check(domain, "SPF", False, "; ".join(failed))
    return Check(domain, "SPF", True, f"pass for {', '.join(passed)}")


# --- DKIM ------------------------------------------------------------------------------------------------


async def check_dkim(res: Resolvers, entry: DkimConfig) -> Check:
    """The key record at ``<selector>._domainkey.<domain>`` must publish the configured key's ``p=``.

    Reports ``missing`` (no key record), ``mismatch`` (another key, a revoked key ``p=``, several key
    records, or a ``k=`` that is not the key's algorithm: all make receivers fail the signature) or ``ok``.
    A key file that cannot be loaded is a failure too: relayd would refuse to start with it.
    """
    domain = entry.domain.lower().rstrip(".")
    name = f"{entry.selector}._domainkey.{domain}"
    try:
        key = load_key(entry.domain, entry.selector, entry.key_file, entry.algorithm)
    except DkimKeyError as exc:
        return Check(domain, "DKIM", False, f"{name}: cannot load the configured key: {exc}")
    try:
        texts = await txt_records(res.async_, name)
    except dns.exception.DNSException as exc:
        return Check(domain, "DKIM", False, f"{name}: lookup failed: {dns_error(exc)}")
    records = [tags for tags in map(tag_list, texts) if "p" in tags]
    if not records:
        return Check(domain, "DKIM", False, f"missing: no DKIM key record (TXT with p=) at {name}")
    if len(records) > 1:
        return Check(domain, "DKIM", False, f"mismatch: {len(records)} key records at {name}, expected one")
    tags = records[0]
    published = re.sub(r"\s+", "", tags["p"])  # FWS is allowed inside the base64 value (RFC 6376 §3.6.1)
    if not published:
        return Check(domain, "DKIM", False, f"mismatch: {name} has an empty p= (key revoked)")
    if published != key.public_key_b64():
        return Check(
            domain, "DKIM", False, f"mismatch: p= at {name} is not the public key of {entry.key_file}"
        )
    k = tags.get("k", "rsa").lower()
    if k != entry.algorithm:
        return Check(domain, "DKIM", False, f"mismatch: {name} says k={k}, the key is {entry.algorithm}")
    return Check(
        domain, "DKIM", True, f"ok: {name} publishes the key of {entry.key_file} ({entry.algorithm})"
    )


# --- DMARC -----------------------------------------------------------------------------------------------


def _dmarc_names(domain: str) -> list[str]:
    """``_dmarc.<domain>`` and then its parents up to (not including) the top-level domain: the DMARCbis
    tree walk (a sub-domain is covered by its organisational domain's record, RFC 7489 §6.6.3)."""
    labels = domain.split(".")
    return [f"_dmarc.{'.'.join(labels[i:])}" for i in range(max(len(labels) - 1, 1))]


async def _dmarc_records(res: Resolvers, name: str) -> list[str]:
    """The ``v=DMARC1`` records at ``name``; DNS failures other than "none there" raise."""
    return [t for t in await txt_records(res.async_, name) if _DMARC_RECORD.match(t)]


async def check_dmarc(res: Resolvers, domain: str) -> Check:
    """A ``v=DMARC1`` record must apply to ``domain``; the detail gives the policy receivers will use.

    Looked up at ``_dmarc.<domain>`` and then its parents up to (not including) the top-level domain, the
    DMARCbis tree walk (a sub-domain is covered by its organisational domain's record, whose ``sp=``
    applies, RFC 7489 §6.6.3). Several records at one name count as none (same section).
    """
    for i, name in enumerate(_dmarc_names(domain)):
        try:
            records = await _dmarc_records(res, name)
        except dns.exception.DNSException as exc:
            return Check(domain, "DMARC", False, f"{name}: lookup failed: {dns_error(exc)}")
        if len(records) > 1:
            return Check(
                domain, "DMARC", False, f"{len(records)} DMARC records at {name}: receivers ignore all"
            )
        if not records:
            continue
        tags = tag_list(records[0])
        policy = tags.get("sp", tags.get("p")) if i else tags.get("p")
        if policy is None or policy.lower() not in _DMARC_POLICIES:
            return Check(domain, "DMARC", False, f"{name}: no valid p= tag in {records[0]!r}")
        where = f" (from {name})" if i else ""
        return Check(domain, "DMARC", True, f"p={policy.lower()}{where}")
    return Check(domain, "DMARC", False, f"missing: no v=DMARC1 record at _dmarc.{domain}")


async def check_rua(res: Resolvers, domain: str, inbound: Sequence[str]) -> Check:
    """Whether the DMARC record that applies to ``domain`` sends its aggregate reports (``rua=``, RFC 7489
    §6.3) to relayd's ``dmarc@<inbound domain>``, where relayd reads them (relayd.reports.dmarc). Reports sent
    elsewhere (a DMARC service) are a choice, not a fault: the row is ok either way and says which."""
    wanted = {f"dmarc@{d}" for d in inbound}
    for name in _dmarc_names(domain):
        try:
            records = await _dmarc_records(res, name)
        except dns.exception.DNSException as exc:
            return Check(domain, "DMARC-RUA", False, f"{name}: lookup failed: {dns_error(exc)}")
        if len(records) != 1:
            continue
        uris = [u.strip() for u in tag_list(records[0]).get("rua", "").split(",") if u.strip()]
        mailtos = [
            u[len("mailto:") :].split("!")[0].strip().lower() for u in uris if u.lower().startswith("mailto:")
        ]
        ours = [m for m in mailtos if m in wanted]
        if ours:
            return Check(domain, "DMARC-RUA", True, f"reports go to relayd ({ours[0]})")
        elsewhere = ", ".join(uris) if uris else "no rua= tag"
        return Check(
            domain, "DMARC-RUA", True, f"not relayd: {elsewhere} (relayd reads reports at dmarc@{inbound[0]})"
        )
    return Check(
        domain, "DMARC-RUA", True, f"no DMARC record: no reports (relayd reads them at dmarc@{inbound[0]})"
    )
