"""The checks of an inbound (VERP) domain: its MX must reach relayd, and it should publish an MTA-STS policy
and a TLS reporting record, so that bounces and reports come back over verified TLS."""

from __future__ import annotations

import ssl
from pathlib import Path
from urllib.parse import unquote, urlsplit

import dns.exception
import dns.rdtypes.ANY.MX
import dns.resolver

from relayd.cli.doctor.lookups import Check, IPAddress, Resolvers, addresses, dns_error, txt_records, warn
from relayd.core.address import AddressError, normalize
from relayd.queue.transport import mtasts, tlsrpt

__all__ = ["check_mta_sts", "check_mx", "check_tls_rpt"]


# --- MX of the inbound domains -----------------------------------------------------------------------------


async def check_mx(res: Resolvers, domain: str, ours: frozenset[IPAddress], hostname: str) -> Check:
    """Every MX host of an inbound domain must be this relayd: ``server.hostname`` or one of our addresses.

    All of them, not just the preferred one: a DSN or ARF report delivered to another host never reaches
    relayd's VERP and complaint attribution, so the suppression list quietly stops growing.
    """
    try:
        answer = await res.async_.resolve(domain, "MX")
    except dns.resolver.NXDOMAIN:
        return Check(domain, "MX", False, f"missing: {domain} does not exist")
    except dns.resolver.NoAnswer:
        return Check(domain, "MX", False, f"missing: no MX record for {domain}")
    except dns.exception.DNSException as exc:
        return Check(domain, "MX", False, f"MX lookup failed: {dns_error(exc)}")
    records: list[dns.rdtypes.ANY.MX.MX] = sorted(answer, key=lambda r: r.preference)
    if len(records) == 1 and records[0].exchange.to_text() == ".":
        return Check(domain, "MX", False, "null MX (RFC 7505): the domain says it accepts no mail")
    good: list[str] = []
    bad: list[str] = []
    for rec in records:
        host = rec.exchange.to_text(omit_final_dot=True).lower()
        try:
            addrs = await addresses(res.async_, host)
        except dns.exception.DNSException as exc:
            bad.append(f"{host}: lookup failed: {dns_error(exc)}")
            continue
        shown = f"{host} ({', '.join(sorted(map(str, addrs)))})"
        if not addrs:
            bad.append(f"{host} has no A/AAAA record")
        elif host == hostname or addrs & ours:
            good.append(shown)
        else:
            bad.append(f"{shown} is not this host")
    if bad:
        expected = ", ".join(sorted({hostname, *map(str, ours)}))
        return Check(domain, "MX", False, "; ".join(bad) + f" (expected {expected})")
    return Check(domain, "MX", True, "MX " + ", ".join(good))


# --- MTA-STS and TLS-RPT of the inbound domains ----------------------------------------------------------


async def check_mta_sts(res: Resolvers, domain: str, ca_file: Path | None) -> Check:
    """The MTA-STS policy of an inbound domain (RFC 8461): the ``_mta-sts`` TXT record, the policy fetched
    as a sender fetches it (certificate verified against the system CA store or ``[delivery]
    tls_ca_file``), and whether its ``mx`` patterns cover every MX host.

    Publishing one is recommended, not required: a missing, malformed or unfetchable policy is a warning
    (senders then use opportunistic TLS, as without one). An ``enforce`` policy that leaves out an MX host
    is a failure: compliant senders will not deliver bounces and reports there."""
    name = f"_mta-sts.{domain}"
    try:
        texts = await txt_records(res.async_, name)
    except dns.exception.DNSException as exc:
        return Check(domain, "MTA-STS", False, f"{name}: lookup failed: {dns_error(exc)}")
    if not any(t.startswith("v=STSv1") for t in texts):
        return warn(domain, "MTA-STS", f"none: no v=STSv1 TXT record at {name} (recommended, RFC 8461)")
    policy_id = mtasts.parse_txt(texts)
    if policy_id is None:
        return warn(domain, "MTA-STS", f"{name}: not exactly one v=STSv1 record with a valid id=")
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        policy = mtasts.parse_policy(await mtasts.fetch_policy(domain, res.async_, context))
    except (mtasts.FetchError, mtasts.PolicyError) as exc:
        return warn(domain, "MTA-STS", f"id={policy_id}, but no policy senders can use: {exc}")
    shown = f"id={policy_id} mode={policy.mode.value} mx={','.join(policy.mx) or '-'}"
    if policy.mode is mtasts.Mode.NONE:
        return warn(domain, "MTA-STS", f"{shown}: mode none asks for nothing")
    try:
        answer = await res.async_.resolve(domain, "MX")
        hosts = [r.exchange.to_text(omit_final_dot=True).lower() for r in answer]
    except dns.exception.DNSException as exc:  # the MX row says what is wrong with the MX
        return warn(domain, "MTA-STS", f"{shown}; MX hosts not compared: {dns_error(exc)}")
    uncovered = [h for h in hosts if h and not any(mtasts.mx_matches(p, h) for p in policy.mx)]
    if uncovered and policy.mode is mtasts.Mode.ENFORCE:
        return Check(domain, "MTA-STS", False, f"{shown} does not cover MX {', '.join(uncovered)}")
    if uncovered:
        return warn(domain, "MTA-STS", f"{shown} does not cover MX {', '.join(uncovered)}")
    return Check(domain, "MTA-STS", True, shown)


def _rua_problem(uri: str) -> str | None:
    """Why ``uri`` is no rua senders can use (RFC 8460 §3: ``mailto:`` an address, or an ``https:``
    URL), or None."""
    if uri.lower().startswith("mailto:"):
        address = unquote(uri[len("mailto:") :].split("?", 1)[0])
        try:
            normalize(address)
        except AddressError as exc:
            return f"{uri}: not a mail address ({exc})"
        return None
    parts = urlsplit(uri)
    if parts.scheme.lower() != "https":
        return f"{uri}: neither mailto: nor https:"
    if not parts.hostname:
        return f"{uri}: no host"
    return None


async def check_tls_rpt(res: Resolvers, domain: str) -> Check:
    """The TLS reporting record of an inbound domain (RFC 8460 §3: ``_smtp._tls`` TXT, ``v=TLSRPTv1;
    rua=...``), so senders tell its owner when TLS to relayd's MX fails. Recommended, so a missing or
    broken record is a warning."""
    name = f"_smtp._tls.{domain}"
    try:
        texts = await txt_records(res.async_, name)
    except dns.exception.DNSException as exc:
        return Check(domain, "TLS-RPT", False, f"{name}: lookup failed: {dns_error(exc)}")
    records = [t for t in texts if t.startswith("v=TLSRPTv1")]
    if not records:
        return warn(domain, "TLS-RPT", f"none: no v=TLSRPTv1 TXT record at {name} (recommended, RFC 8460)")
    if len(records) > 1:
        return warn(domain, "TLS-RPT", f"{len(records)} v=TLSRPTv1 records at {name}: senders ignore all")
    ruas = tlsrpt.parse_rua(records)
    if not ruas:
        return warn(domain, "TLS-RPT", f"{name}: no rua= in {records[0]!r}")
    problems = [p for p in map(_rua_problem, ruas) if p is not None]
    if problems:
        return warn(domain, "TLS-RPT", f"{name}: " + "; ".join(problems))
    return Check(domain, "TLS-RPT", True, "rua=" + ",".join(ruas))
