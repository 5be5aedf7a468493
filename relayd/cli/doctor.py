"""``relayd check-config --dns``: does the published DNS say what the config says?

Mail from a bulk sender is judged by records relayd does not control: the SPF record must authorise every
address relayd sends from (RFC 7208), the DKIM key record must hold the public half of the key relayd signs
with (RFC 6376 §3.6), the domain should publish a DMARC policy (RFC 7489; Gmail and Yahoo require one of
bulk senders since 2024), and the inbound (VERP) domains must have an MX that reaches relayd, or bounces and
complaints never come back and suppression silently stops working. A typo in any of these costs days of
junk-foldered mail before anyone notices, so the operator can ask before sending. The inbound domains
should also publish an MTA-STS policy (RFC 8461) and a TLS reporting record (RFC 8460), so that bounces and
reports reach relayd over verified TLS; those rows warn (``WARN``) rather than fail.

Each check is one :class:`Check` row; :func:`format_table` prints them. DNS trouble (timeouts, SERVFAIL, no
resolver configuration) never raises: it is a failed check whose detail says what went wrong, because the
point of the tool is to report, and one broken zone must not hide the results for the others.

Lookups go to ``[delivery] nameservers`` when set (the resolver relayd delivers with), else the system
resolver. The SPF evaluation is pyspf's (macros, includes, the 10-lookup limit: RFC 7208 is too intricate to
redo here); its DNS is routed through the same nameservers, see :func:`_spf_dns_lookup`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import socket
import ssl
from collections.abc import Awaitable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdtypes.ANY.MX
import dns.resolver
import spf

from relayd.config import Config, DkimConfig, parse_hostport
from relayd.core.address import AddressError, normalize
from relayd.mail.dkim import DkimKeyError, load_key
from relayd.queue.transport import mtasts, tlsrpt

__all__ = ["Check", "CheckName", "format_table", "run_checks"]

CheckName = Literal["SPF", "DKIM", "DMARC", "DMARC-RUA", "MX", "MTA-STS", "TLS-RPT"]

#: Seconds allowed for one DNS question (all retries). Short: an operator waits for the answer.
_LIFETIME = 5.0
#: Seconds allowed for one whole SPF evaluation (RFC 7208 §4.6.4 suggests at least 20).
_SPF_TIME = 20.0
#: Any address outside this host: connect() on a UDP socket picks route and source without sending.
_PROBE_ADDRESS = "192.0.2.1"

_DMARC_RECORD = re.compile(r"^v\s*=\s*DMARC1\s*(;|$)")
_DMARC_POLICIES = frozenset({"none", "quarantine", "reject"})

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


# --- resolvers -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Resolvers:
    """The async resolver for our own lookups and a blocking one for pyspf (it runs in a thread)."""

    async_: dns.asyncresolver.Resolver
    sync: dns.resolver.Resolver


def _make_resolvers(nameservers: Sequence[str]) -> _Resolvers:
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
        r.lifetime = _LIFETIME
        r.timeout = _LIFETIME / 2
    return _Resolvers(a, s)


def _dns_error(exc: BaseException) -> str:
    """A short, operator-readable text for a failed lookup."""
    if isinstance(exc, dns.resolver.NXDOMAIN):
        return "no such domain (NXDOMAIN)"
    if isinstance(exc, dns.resolver.NoAnswer):
        return "no record of that type"
    if isinstance(exc, dns.exception.Timeout):
        return f"DNS timeout ({exc})"
    return str(exc) or type(exc).__name__


async def _txt(res: dns.asyncresolver.Resolver, name: str) -> list[str]:
    """The TXT records at ``name``, each one's strings joined (RFC 7208 §3.3, RFC 6376 §3.6.2.2).

    An absent name or type is an empty list; any other DNS failure raises ``dns.exception.DNSException``.
    Records are decoded as UTF-8 with replacement: a garbled record should show up as a mismatch, not a crash.
    """
    try:
        answer = await res.resolve(name, "TXT")
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]


async def _addresses(res: dns.asyncresolver.Resolver, host: str) -> set[IPAddress]:
    """The A and AAAA addresses of ``host`` (empty if it has none); other DNS failures raise."""

    async def one(rdtype: str) -> set[IPAddress]:
        try:
            answer = await res.resolve(host, rdtype)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return set()
        return {ipaddress.ip_address(r.address) for r in answer}

    v4, v6 = await asyncio.gather(one("A"), one("AAAA"))
    return v4 | v6


def _tags(record: str) -> dict[str, str]:
    """A DKIM/DMARC tag-list (RFC 6376 §3.2) as a dict; later duplicates lose, as most verifiers do."""
    tags: dict[str, str] = {}
    for part in record.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            tags.setdefault(name.strip(), value.strip())
    return tags


# --- SPF through pyspf ---------------------------------------------------------------------------------

_SPF_RESOLVER: ContextVar[dns.resolver.Resolver | None] = ContextVar(
    "relayd_doctor_spf_resolver", default=None
)


def _spf_dns_lookup(name: str, qtype: str, strict: object = True, timeout: float = _LIFETIME) -> list[Any]:
    """Drop-in for ``spf.DNSLookup``: the same result shape as pyspf's dnspython driver, asking our resolver.

    pyspf looks names up through its module-level ``DNSLookup`` and has no resolver parameter, so that
    function is replaced (once, see :func:`_install_spf_lookup`). The resolver is taken from a context
    variable set by the thread running the check, so concurrent checks with different nameservers do not
    interfere; anyone else using pyspf in this process (no context set) gets the default resolver, as
    before. pyspf's own driver also calls ``dns.resolver.query``, deprecated since dnspython 2.0.
    Failures other than "no such name/record" become ``spf.TempError``, which pyspf reports as
    ``temperror``.
    """
    out: list[Any] = []
    try:
        resolver = _SPF_RESOLVER.get() or dns.resolver.get_default_resolver()
        answer = resolver.resolve(name, qtype, lifetime=min(float(timeout), _LIFETIME))
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return out
    except dns.exception.DNSException as exc:
        raise spf.TempError(f"DNS {_dns_error(exc)}") from exc
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


def _install_spf_lookup() -> None:
    if spf.DNSLookup is not _spf_dns_lookup:
        spf.DNSLookup = _spf_dns_lookup


async def _spf_result(res: _Resolvers, ip: str, domain: str, helo: str) -> tuple[str, str]:
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


async def _check_spf(res: _Resolvers, domain: str, sources: Sequence[tuple[str, str]]) -> Check:
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


async def _check_dkim(res: _Resolvers, entry: DkimConfig) -> Check:
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
        texts = await _txt(res.async_, name)
    except dns.exception.DNSException as exc:
        return Check(domain, "DKIM", False, f"{name}: lookup failed: {_dns_error(exc)}")
    records = [tags for tags in map(_tags, texts) if "p" in tags]
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


async def _check_dmarc(res: _Resolvers, domain: str) -> Check:
    """A ``v=DMARC1`` record must apply to ``domain``; the detail gives the policy receivers will use.

    Looked up at ``_dmarc.<domain>`` and then its parents up to (not including) the top-level domain, the
    DMARCbis tree walk (a sub-domain is covered by its organisational domain's record, whose ``sp=``
    applies, RFC 7489 §6.6.3). Several records at one name count as none (same section).
    """
    labels = domain.split(".")
    for i in range(max(len(labels) - 1, 1)):
        owner = ".".join(labels[i:])
        name = f"_dmarc.{owner}"
        try:
            texts = await _txt(res.async_, name)
        except dns.exception.DNSException as exc:
            return Check(domain, "DMARC", False, f"{name}: lookup failed: {_dns_error(exc)}")
        records = [t for t in texts if _DMARC_RECORD.match(t)]
        if len(records) > 1:
            return Check(
                domain, "DMARC", False, f"{len(records)} DMARC records at {name}: receivers ignore all"
            )
        if not records:
            continue
        tags = _tags(records[0])
        policy = tags.get("sp", tags.get("p")) if i else tags.get("p")
        if policy is None or policy.lower() not in _DMARC_POLICIES:
            return Check(domain, "DMARC", False, f"{name}: no valid p= tag in {records[0]!r}")
        where = f" (from {name})" if i else ""
        return Check(domain, "DMARC", True, f"p={policy.lower()}{where}")
    return Check(domain, "DMARC", False, f"missing: no v=DMARC1 record at _dmarc.{domain}")


async def _check_rua(res: _Resolvers, domain: str, inbound: Sequence[str]) -> Check:
    """Whether the DMARC record that applies to ``domain`` sends its aggregate reports (``rua=``, RFC 7489
    §6.3) to relayd's ``dmarc@<inbound domain>``, where relayd reads them (relayd.reports.dmarc). Reports sent
    elsewhere (a DMARC service) are a choice, not a fault: the row is ok either way and says which."""
    labels = domain.split(".")
    wanted = {f"dmarc@{d}" for d in inbound}
    for i in range(max(len(labels) - 1, 1)):
        name = f"_dmarc.{'.'.join(labels[i:])}"
        try:
            texts = await _txt(res.async_, name)
        except dns.exception.DNSException as exc:
            return Check(domain, "DMARC-RUA", False, f"{name}: lookup failed: {_dns_error(exc)}")
        records = [t for t in texts if _DMARC_RECORD.match(t)]
        if len(records) != 1:
            continue
        uris = [u.strip() for u in _tags(records[0]).get("rua", "").split(",") if u.strip()]
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


# --- MX of the inbound domains -----------------------------------------------------------------------------


async def _check_mx(res: _Resolvers, domain: str, ours: frozenset[IPAddress], hostname: str) -> Check:
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
        return Check(domain, "MX", False, f"MX lookup failed: {_dns_error(exc)}")
    records: list[dns.rdtypes.ANY.MX.MX] = sorted(answer, key=lambda r: r.preference)
    if len(records) == 1 and records[0].exchange.to_text() == ".":
        return Check(domain, "MX", False, "null MX (RFC 7505): the domain says it accepts no mail")
    good: list[str] = []
    bad: list[str] = []
    for rec in records:
        host = rec.exchange.to_text(omit_final_dot=True).lower()
        try:
            addrs = await _addresses(res.async_, host)
        except dns.exception.DNSException as exc:
            bad.append(f"{host}: lookup failed: {_dns_error(exc)}")
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


def _warn(domain: str, what: CheckName, detail: str) -> Check:
    return Check(domain, what, True, detail, warning=True)


async def _check_mta_sts(res: _Resolvers, domain: str, ca_file: Path | None) -> Check:
    """The MTA-STS policy of an inbound domain (RFC 8461): the ``_mta-sts`` TXT record, the policy fetched
    as a sender fetches it (certificate verified against the system CA store or ``[delivery]
    tls_ca_file``), and whether its ``mx`` patterns cover every MX host.

    Publishing one is recommended, not required: a missing, malformed or unfetchable policy is a warning
    (senders then use opportunistic TLS, as without one). An ``enforce`` policy that leaves out an MX host
    is a failure: compliant senders will not deliver bounces and reports there."""
    name = f"_mta-sts.{domain}"
    try:
        texts = await _txt(res.async_, name)
    except dns.exception.DNSException as exc:
        return Check(domain, "MTA-STS", False, f"{name}: lookup failed: {_dns_error(exc)}")
    if not any(t.startswith("v=STSv1") for t in texts):
        return _warn(domain, "MTA-STS", f"none: no v=STSv1 TXT record at {name} (recommended, RFC 8461)")
    policy_id = mtasts.parse_txt(texts)
    if policy_id is None:
        return _warn(domain, "MTA-STS", f"{name}: not exactly one v=STSv1 record with a valid id=")
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        policy = mtasts.parse_policy(await mtasts.fetch_policy(domain, res.async_, context))
    except (mtasts.FetchError, mtasts.PolicyError) as exc:
        return _warn(domain, "MTA-STS", f"id={policy_id}, but no policy senders can use: {exc}")
    shown = f"id={policy_id} mode={policy.mode.value} mx={','.join(policy.mx) or '-'}"
    if policy.mode is mtasts.Mode.NONE:
        return _warn(domain, "MTA-STS", f"{shown}: mode none asks for nothing")
    try:
        answer = await res.async_.resolve(domain, "MX")
        hosts = [r.exchange.to_text(omit_final_dot=True).lower() for r in answer]
    except dns.exception.DNSException as exc:  # the MX row says what is wrong with the MX
        return _warn(domain, "MTA-STS", f"{shown}; MX hosts not compared: {_dns_error(exc)}")
    uncovered = [h for h in hosts if h and not any(mtasts.mx_matches(p, h) for p in policy.mx)]
    if uncovered and policy.mode is mtasts.Mode.ENFORCE:
        return Check(domain, "MTA-STS", False, f"{shown} does not cover MX {', '.join(uncovered)}")
    if uncovered:
        return _warn(domain, "MTA-STS", f"{shown} does not cover MX {', '.join(uncovered)}")
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


async def _check_tls_rpt(res: _Resolvers, domain: str) -> Check:
    """The TLS reporting record of an inbound domain (RFC 8460 §3: ``_smtp._tls`` TXT, ``v=TLSRPTv1;
    rua=...``), so senders tell its owner when TLS to relayd's MX fails. Recommended, so a missing or
    broken record is a warning."""
    name = f"_smtp._tls.{domain}"
    try:
        texts = await _txt(res.async_, name)
    except dns.exception.DNSException as exc:
        return Check(domain, "TLS-RPT", False, f"{name}: lookup failed: {_dns_error(exc)}")
    records = [t for t in texts if t.startswith("v=TLSRPTv1")]
    if not records:
        return _warn(domain, "TLS-RPT", f"none: no v=TLSRPTv1 TXT record at {name} (recommended, RFC 8460)")
    if len(records) > 1:
        return _warn(domain, "TLS-RPT", f"{len(records)} v=TLSRPTv1 records at {name}: senders ignore all")
    ruas = tlsrpt.parse_rua(records)
    if not ruas:
        return _warn(domain, "TLS-RPT", f"{name}: no rua= in {records[0]!r}")
    problems = [p for p in map(_rua_problem, ruas) if p is not None]
    if problems:
        return _warn(domain, "TLS-RPT", f"{name}: " + "; ".join(problems))
    return Check(domain, "TLS-RPT", True, "rua=" + ",".join(ruas))


# --- planning ---------------------------------------------------------------------------------------------


def _default_source_address() -> str:
    """The address this host sends from by default (the source of its route to the outside)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((_PROBE_ADDRESS, 25))
        return str(sock.getsockname()[0])


def _sources(cfg: Config, outbound_ips: Sequence[str] | None) -> dict[str, list[tuple[str, str]]]:
    """(address, helo) pairs each sending domain goes out from, in config order, without repeats.

    An account's ``pool`` gives its addresses; an account without one may be sent from any pool's
    addresses; with no pools at all, ``outbound_ips``, else this host's default source address.
    Raises ``OSError`` when that default is needed and the host has no route out.
    """
    default_helo = cfg.delivery.helo or cfg.server.hostname
    all_pools = [(ip, p.helo or default_helo) for p in cfg.pools.values() for ip in p.addresses]
    fallback: list[tuple[str, str]] | None = None
    out: dict[str, list[tuple[str, str]]] = {}
    for acct in cfg.accounts.values():
        if acct.pool:
            pool = cfg.pools[acct.pool]
            pairs = [(ip, pool.helo or default_helo) for ip in pool.addresses]
        elif all_pools:
            pairs = all_pools
        else:
            if fallback is None:
                ips = list(outbound_ips) if outbound_ips else [_default_source_address()]
                fallback = [(ip, default_helo) for ip in ips]
            pairs = fallback
        for domain in acct.domains:
            known = out.setdefault(domain, [])
            for pair in pairs:
                if pair not in known:
                    known.append(pair)
    return out


def _our_addresses(cfg: Config, sources: dict[str, list[tuple[str, str]]]) -> frozenset[IPAddress]:
    """Addresses an MX may point to: every outbound address, and the inbound listener's own address.

    Listen addresses count only when the world can reach them (not 0.0.0.0/::, not loopback); host names
    there are left out, ``server.hostname`` is compared by name instead.
    """
    found: set[IPAddress] = set()
    for text in [ip for pairs in sources.values() for ip, _ in pairs] + [
        ip for p in cfg.pools.values() for ip in p.addresses
    ]:
        with contextlib.suppress(ValueError):
            found.add(ipaddress.ip_address(text))
    for listen in cfg.inbound.listen:
        try:
            addr = ipaddress.ip_address(parse_hostport(listen)[0])
        except ValueError:
            continue
        if not (addr.is_unspecified or addr.is_loopback):
            found.add(addr)
    return frozenset(found)


def _dkim_plan(cfg: Config, sending: Sequence[str]) -> dict[str, list[DkimConfig] | Check]:
    """Per sending domain: the ``[[dkim]]`` entries to check, or why there is none to check.

    A domain without a key of its own is signed with its account's ``signing_domain`` key (see
    ``policy/pipeline.py``); those keys are checked under the signing domain, once. A domain with neither
    goes out unsigned, which is a failure.
    """
    by_domain: dict[str, list[DkimConfig]] = {}
    for entry in cfg.dkim:
        by_domain.setdefault(entry.domain.lower().rstrip("."), []).append(entry)
    plan: dict[str, list[DkimConfig] | Check] = {d: by_domain[d] for d in sending if d in by_domain}
    for acct in cfg.accounts.values():
        signer = (acct.signing_domain or "").lower().rstrip(".")
        for domain in acct.domains:
            if domain in plan:
                continue
            if signer in by_domain:
                plan.setdefault(signer, by_domain[signer])
                plan[domain] = Check(domain, "DKIM", True, f"no key of its own; signed as d={signer}")
            else:
                plan[domain] = Check(domain, "DKIM", False, "no [[dkim]] key: its mail goes out unsigned")
    return plan


async def run_checks(
    cfg: Config, *, resolver_nameservers: list[str] | None = None, outbound_ips: list[str] | None = None
) -> list[Check]:
    """Check SPF, DKIM and DMARC of every sending domain and the MX of every inbound domain.

    ``resolver_nameservers`` ("host:port") overrides ``[delivery] nameservers``; with neither, the system
    resolver is used. ``outbound_ips`` is used when no ``[pools.*]`` is configured, instead of guessing this
    host's address. Rows come per sending domain (SPF, DKIM per key, DMARC), then where each sending
    domain's DMARC reports go, then MTA-STS and TLS-RPT per inbound domain, then one MX row per inbound
    domain. Never raises for DNS trouble: a failed lookup is a failed check with the error as detail.
    """
    _install_spf_lookup()
    sending = list(dict.fromkeys(d for acct in cfg.accounts.values() for d in acct.domains))
    nameservers = resolver_nameservers if resolver_nameservers is not None else cfg.delivery.nameservers
    try:
        res: _Resolvers | None = _make_resolvers(nameservers)
        problem = ""
    except (ValueError, dns.exception.DNSException) as exc:
        res, problem = None, f"no usable DNS resolver: {exc}"
    try:
        sources = _sources(cfg, outbound_ips)
    except OSError as exc:
        sources = {}
        spf_problem = f"cannot tell this host's outbound address ({exc}); set [pools.NAME] addresses"
    else:
        spf_problem = ""
    ours = _our_addresses(cfg, sources)
    hostname = cfg.server.hostname.lower().rstrip(".")

    plan: list[Awaitable[Check] | Check] = []
    dkim = _dkim_plan(cfg, sending)
    for domain in dict.fromkeys([*sending, *dkim]):
        if domain in sending:
            if res is None or spf_problem:
                plan.append(Check(domain, "SPF", False, problem or spf_problem))
            else:
                plan.append(_check_spf(res, domain, sources[domain]))
        entries = dkim.get(domain, [])
        if isinstance(entries, Check):
            plan.append(entries)
        else:
            for entry in entries:
                plan.append(_check_dkim(res, entry) if res else Check(domain, "DKIM", False, problem))
        if domain in sending:
            plan.append(_check_dmarc(res, domain) if res else Check(domain, "DMARC", False, problem))
    if res is not None:  # where each sending domain's DMARC reports go (relayd.reports.dmarc reads them)
        plan += [_check_rua(res, domain, cfg.inbound.domains) for domain in sending]
    if res is not None:  # what the inbound domains ask of those who send them mail (RFC 8461, RFC 8460)
        for domain in cfg.inbound.domains:
            plan += [_check_mta_sts(res, domain, cfg.delivery.tls_ca_file), _check_tls_rpt(res, domain)]
    for domain in cfg.inbound.domains:
        plan.append(_check_mx(res, domain, ours, hostname) if res else Check(domain, "MX", False, problem))

    async def settle(job: Awaitable[Check] | Check) -> Check:
        return job if isinstance(job, Check) else await job

    return list(await asyncio.gather(*map(settle, plan)))


def _result(check: Check) -> str:
    if not check.ok:
        return "FAIL"
    return "WARN" if check.warning else "ok"


def format_table(checks: Iterable[Check]) -> str:
    """The checks as a plain-text table (DOMAIN, CHECK, RESULT, DETAIL), columns aligned with spaces.

    Plain text rather than box drawing: it goes into terminals, CI logs and tickets alike. Ends with a
    newline; the last column is not padded.
    """
    rows = [("DOMAIN", "CHECK", "RESULT", "DETAIL")]
    rows += [(c.domain, c.what, _result(c), c.detail) for c in checks]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [
        "  ".join([*(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)), row[3]]).rstrip()
        for row in rows
    ]
    return "\n".join(lines) + "\n"
