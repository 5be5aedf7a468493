"""Which records ``relayd check-config --dns`` checks for a config, in which order, and the report table."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Awaitable, Iterable, Sequence

import dns.exception

from relayd.cli.doctor.inbound import check_mta_sts, check_mx, check_tls_rpt
from relayd.cli.doctor.lookups import Check, IPAddress, Resolvers, make_resolvers
from relayd.cli.doctor.sending import check_dkim, check_dmarc, check_rua, check_spf, install_spf_lookup
from relayd.config import Config, DkimConfig, parse_hostport

__all__ = ["format_table", "run_checks"]

#: Any address outside this host: connect() on a UDP socket picks route and source without sending.
_PROBE_ADDRESS = "192.0.2.1"


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
    install_spf_lookup()
    sending = list(dict.fromkeys(d for acct in cfg.accounts.values() for d in acct.domains))
    nameservers = resolver_nameservers if resolver_nameservers is not None else cfg.delivery.nameservers
    try:
        res: Resolvers | None = make_resolvers(nameservers)
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
                plan.append(check_spf(res, domain, sources[domain]))
        entries = dkim.get(domain, [])
        if isinstance(entries, Check):
            plan.append(entries)
        else:
            for entry in entries:
                plan.append(check_dkim(res, entry) if res else Check(domain, "DKIM", False, problem))
        if domain in sending:
            plan.append(check_dmarc(res, domain) if res else Check(domain, "DMARC", False, problem))
    if res is not None:  # where each sending domain's DMARC reports go (relayd.reports.dmarc reads them)
        plan += [check_rua(res, domain, cfg.inbound.domains) for domain in sending]
    if res is not None:  # what the inbound domains ask of those who send them mail (RFC 8461, RFC 8460)
        for domain in cfg.inbound.domains:
            plan += [check_mta_sts(res, domain, cfg.delivery.tls_ca_file), check_tls_rpt(res, domain)]
    for domain in cfg.inbound.domains:
        plan.append(check_mx(res, domain, ours, hostname) if res else Check(domain, "MX", False, problem))

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
