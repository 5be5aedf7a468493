"""DMARC aggregate reports turned into counts, and counts into the summary an operator reads.

Why only the configured sending domains: anyone can mail ``dmarc@``, and a report about a domain relayd
does not send for says nothing to its operator; refusing it keeps the store and the metric labels bounded
(``relayd_dmarc_messages_total`` takes only configured domains as ``domain``). A report about an
organisational domain of a sending domain (``example.test`` for ``news.example.test``) is taken, since
that is where receivers look up the policy of a sub-domain without one (RFC 7489 §6.6.3).

What the counts mean: ``spf_aligned``/``dkim_aligned`` are the receiver's DMARC evaluation, and a message
passes DMARC when either is aligned (``dmarc_pass``); ``spf_pass``/``dkim_pass`` say whether the checks
passed at all, which tells "not signed" from "signed by the wrong domain". Sources are split into
relayd's own addresses (every ``[pools.NAME] addresses``) and the rest: another server, or a forger,
sending in the customer's name.

Nothing here acts on anything: reports are unauthenticated, so they inform, never suppress or suspend.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime

from relayd.config import Config
from relayd.reports.dmarc import DmarcReport
from relayd.store.models import DmarcCount

__all__ = [
    "PassRates",
    "Summary",
    "counts_of",
    "own_addresses",
    "report_domain",
    "sending_domains",
    "summarize",
]


def sending_domains(cfg: Config) -> frozenset[str]:
    """Every domain relayd sends for: the accounts' domains and the ``[[dkim]]`` signing domains."""
    domains = {d.lower().rstrip(".") for acct in cfg.accounts.values() for d in acct.domains}
    domains |= {d.domain.lower().rstrip(".") for d in cfg.dkim}
    return frozenset(domains)


def report_domain(cfg: Config, domain: str) -> str | None:
    """``domain`` when reports about it are taken (a sending domain or a parent of one), else None."""
    domain = domain.lower().rstrip(".")
    for sending in sending_domains(cfg):
        if sending == domain or sending.endswith("." + domain):
            return domain
    return None


def own_addresses(cfg: Config) -> frozenset[str]:
    """The addresses relayd's mail leaves from, as configured (``[pools.NAME] addresses``), normalized."""
    found = set()
    for pool in cfg.pools.values():
        for address in pool.addresses:
            try:
                found.add(str(ipaddress.ip_address(address)))
            except ValueError:
                continue
    return frozenset(found)


def counts_of(report: DmarcReport) -> list[DmarcCount]:
    """A report's records added up per source IP, on the UTC day its range begins."""
    day = datetime.fromtimestamp(report.begin, UTC).date() if report.begin else datetime.now(UTC).date()
    by_source: dict[str, list[int]] = {}
    for r in report.records:
        n = r.count
        sums = by_source.setdefault(r.source_ip, [0] * 8)
        for i, hit in enumerate(
            (
                True,
                r.spf_pass,
                r.dkim_pass,
                r.spf_aligned,
                r.dkim_aligned,
                r.spf_aligned or r.dkim_aligned,
                r.disposition == "quarantine",
                r.disposition == "reject",
            )
        ):
            sums[i] += n if hit else 0
    return [
        DmarcCount(report.domain, day, report.org, report.report_id, ip, *sums)
        for ip, sums in sorted(by_source.items())
    ]


@dataclass(frozen=True, slots=True)
class PassRates:
    """The counts of one reporter or one source over the summary's days."""

    name: str
    own: bool
    total: int
    dmarc_pass: int
    spf_aligned: int
    dkim_aligned: int
    spf_pass: int
    dkim_pass: int
    quarantined: int
    rejected: int

    def rate(self, part: int) -> float:
        """``part`` as a share of ``total`` (0 when there were no messages)."""
        return part / self.total if self.total else 0.0

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "own": self.own,
            "total": self.total,
            "dmarc_pass": self.dmarc_pass,
            "dmarc_pass_rate": round(self.rate(self.dmarc_pass), 4),
            "spf_aligned_rate": round(self.rate(self.spf_aligned), 4),
            "dkim_aligned_rate": round(self.rate(self.dkim_aligned), 4),
            "spf_pass_rate": round(self.rate(self.spf_pass), 4),
            "dkim_pass_rate": round(self.rate(self.dkim_pass), 4),
            "quarantined": self.quarantined,
            "rejected": self.rejected,
        }


@dataclass(frozen=True, slots=True)
class Summary:
    """``relayd dmarc summary``: a domain's counts since a day, by reporter and by source IP."""

    domain: str
    since: date
    reports: int
    by_reporter: tuple[PassRates, ...]
    by_source: tuple[PassRates, ...]


def _add(name: str, own: bool, counts: Iterable[DmarcCount]) -> PassRates:
    sums = [0] * 8
    for c in counts:
        for i, n in enumerate(
            (
                c.total,
                c.dmarc_pass,
                c.spf_aligned,
                c.dkim_aligned,
                c.spf_pass,
                c.dkim_pass,
                c.quarantined,
                c.rejected,
            )
        ):
            sums[i] += n
    return PassRates(name, own, *sums)


def summarize(domain: str, since: date, counts: Sequence[DmarcCount], own: frozenset[str]) -> Summary:
    """Group ``counts`` by reporter and by source; sources sorted own first, then by volume."""
    reporters: dict[str, list[DmarcCount]] = {}
    sources: dict[str, list[DmarcCount]] = {}
    for c in counts:
        reporters.setdefault(c.org, []).append(c)
        sources.setdefault(c.source_ip, []).append(c)
    by_reporter = sorted(
        (_add(o, False, cs) for o, cs in reporters.items()), key=lambda p: (-p.total, p.name)
    )
    by_source = sorted(
        (_add(ip, ip in own, cs) for ip, cs in sources.items()), key=lambda p: (not p.own, -p.total, p.name)
    )
    reports = len({(c.org, c.report_id) for c in counts})
    return Summary(domain, since, reports, tuple(by_reporter), tuple(by_source))
