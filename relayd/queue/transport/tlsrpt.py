"""SMTP TLS reporting (RFC 8460): what each policy domain's MX hosts did with our TLS, once a day.

Counted: every TLS session to an MX host under a policy (MTA-STS, or DANE TLSA), successful or failed,
failures by result type (§4.3) and receiving host; a delivery an ``enforce`` policy stopped because no MX
host matched counts as one failed session (``validation-failure``). Deliveries without a policy are not
counted: the report is for domains that publish one. Counts are kept in memory and added to the store
every :data:`FLUSH_INTERVAL` seconds (and when delivery stops), so every node adds to the same rows.

Reported: once a day, for each earlier UTC day not reported yet (up to :data:`CATCH_UP_DAYS` back, so a
node that was down catches up), the policy domain's ``_smtp._tls`` TXT record (``v=TLSRPTv1;
rua=...``) is looked up, a node claims the day in the store (one report per domain and day from the whole
cluster), and the aggregate report (§4.4, JSON, gzip) is mailed to each ``mailto:`` rua as a
``multipart/report; report-type="tlsrpt"`` message (§5.3) through relayd's own queue, DKIM-signed when
relayd has a key for the inbound domain it comes from, and POSTed to each ``https:`` rua as
``application/tlsrpt+gzip`` (§5.4): certificate verified (the system CA store, or ``[delivery]
tls_ca_file``), host name resolved through delivery's resolver, no redirects, :data:`POST_TIMEOUT` in
all, any 2xx is success. A failed POST is logged and counted, not retried: the day is claimed before it
is sent (one report from the whole cluster), and RFC 8460 §5.4 leaves retries to the sender.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import SMTP
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Protocol

import dns.asyncresolver
import dns.exception
import dns.resolver

from relayd.config import Config
from relayd.core import metrics
from relayd.core.errors import StorageError
from relayd.core.tokens import new_queue_id
from relayd.mail.dkim import Signer
from relayd.queue.store import NewMessage, QueueStore
from relayd.store.models import TlsSessionCount
from relayd.store.protocols import MtaStsCache, TlsReportStore

log = logging.getLogger(__name__)

#: Seconds between additions of the in-memory counts to the store.
FLUSH_INTERVAL = 60.0
#: Seconds between looks for days to report.
SEND_INTERVAL = 3600.0
#: Earlier days looked at for unreported counts; older counts are pruned.
CATCH_UP_DAYS = 7
#: The account name reports are queued under: never a configured account (account names have no dots).
REPORT_ACCOUNT = "relayd.tlsrpt"
#: Bytes of a gzipped report beyond which it is not mailed (RFC 8460 §5.3 leaves the limit to the sender).
MAX_REPORT_BYTES = 10_000_000
#: Seconds one POST of a report to an ``https:`` rua may take in all (connect, TLS, upload, reply).
POST_TIMEOUT = 60.0
#: The media type of a gzipped report (RFC 8460 §6.4.2), in mail and in a POST alike.
GZIP_TYPE = "application/tlsrpt+gzip"


class TransportStore(MtaStsCache, TlsReportStore, Protocol):
    """The store slices delivery's transport security uses."""


@dataclass(frozen=True, slots=True)
class PolicyRef:
    """The policy a session was made under, as the report describes it (§4.4 ``policy``)."""

    domain: str
    policy_type: str  # sts, tlsa
    strings: tuple[str, ...]
    mx: tuple[str, ...]

    def policy_json(self) -> str:
        return json.dumps({"policy-string": list(self.strings), "mx-host": list(self.mx)}, sort_keys=True)


class SessionCounter:
    """Counts sessions in memory; :meth:`flush` adds them to the store."""

    def __init__(self, store: TlsReportStore, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        self._counts: dict[tuple[date, PolicyRef, str, str, str], int] = {}
        self._task: asyncio.Task[None] | None = None

    def session(self, ref: PolicyRef, mx: str, ip: str, result: str | None) -> None:
        """One TLS session to ``mx`` (``ip``): successful (``result`` None) or failed with ``result``."""
        day = datetime.fromtimestamp(self._clock(), UTC).date()
        key = (day, ref, result or "", "" if result is None else mx, "" if result is None else ip)
        self._counts[key] = self._counts.get(key, 0) + 1
        metrics.TLSRPT_SESSIONS.labels(ref.policy_type, result or "success").inc()

    async def flush(self) -> None:
        counts, self._counts = self._counts, {}
        rows = [
            TlsSessionCount(day, ref.domain, ref.policy_type, ref.policy_json(), result, mx, ip, n)
            for (day, ref, result, mx, ip), n in counts.items()
        ]
        if not rows:
            return
        try:
            await self._store.add_tls_sessions(rows)
        except StorageError as exc:  # kept for the next flush: a report a minute late is still right
            log.warning("TLS reporting: adding %d count(s) to the store failed: %s", len(rows), exc)
            for (day, ref, result, mx, ip), n in counts.items():
                key = (day, ref, result, mx, ip)
                self._counts[key] = self._counts.get(key, 0) + n

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="tlsrpt-flush")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            await self.flush()


def parse_rua(records: Iterable[str]) -> list[str]:
    """The ``rua`` URIs of the ``_smtp._tls`` TXT record (§3): exactly one record starting
    ``v=TLSRPTv1``, fields ``;``-separated, URIs ``,``-separated. No valid record: no URIs."""
    ours = [r for r in records if r.startswith("v=TLSRPTv1")]
    if len(ours) != 1:
        return []
    fields = [f.strip(" \t") for f in ours[0].split(";")]
    if fields[0] != "v=TLSRPTv1":
        return []
    for f in fields[1:]:
        key, eq, value = f.partition("=")
        if eq and key.strip(" \t") == "rua":
            return [u.strip(" \t") for u in value.split(",") if u.strip(" \t")]
    return []


def report_json(
    counts: list[TlsSessionCount], domain: str, day: date, organization: str, contact: str
) -> dict[str, object]:
    """The aggregate report of one policy domain and day (§4.4)."""
    policies: dict[tuple[str, str], dict[str, object]] = {}
    for c in counts:
        entry = policies.get((c.policy_type, c.policy))
        if entry is None:
            described = json.loads(c.policy)
            entry = {
                "policy": {
                    "policy-type": c.policy_type,
                    "policy-string": described["policy-string"],
                    "policy-domain": domain,
                    "mx-host": described["mx-host"],
                },
                "summary": {"total-successful-session-count": 0, "total-failure-session-count": 0},
                "failure-details": [],
            }
            policies[(c.policy_type, c.policy)] = entry
        summary = entry["summary"]
        assert isinstance(summary, dict)
        if not c.result_type:
            summary["total-successful-session-count"] += c.sessions
            continue
        summary["total-failure-session-count"] += c.sessions
        details = entry["failure-details"]
        assert isinstance(details, list)
        details.append(
            {
                "result-type": c.result_type,
                "receiving-mx-hostname": c.receiving_mx,
                "receiving-ip": c.receiving_ip,
                "failed-session-count": c.sessions,
            }
        )
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return {
        "organization-name": organization,
        "date-range": {
            "start-datetime": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "end-datetime": (start + timedelta(days=1) - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
        "contact-info": contact,
        "report-id": f"{day.isoformat()}.{domain}@{organization}",
        "policies": list(policies.values()),
    }


def report_gzip(report: dict[str, object]) -> bytes:
    """The report as sent: JSON, gzip-compressed (§5: "compressed using gzip")."""
    return gzip.compress(json.dumps(report, indent=1).encode(), mtime=0)


class PostError(Exception):
    """A report could not be POSTed to an ``https:`` rua (network, TLS, timeout, or a non-2xx reply)."""


async def post_report(
    url: str, body: bytes, resolver: dns.asyncresolver.Resolver, context: ssl.SSLContext
) -> int:
    """POST the gzipped report ``body`` to ``url`` (§5.4); return the HTTP status (2xx). Redirects are
    not followed (a report goes where the domain's DNS says, nowhere else). Raises :class:`PostError`."""
    import aiohttp  # here: only a process that posts a report loads it

    from relayd.queue.transport.httpresolver import DnsResolver

    connector = aiohttp.TCPConnector(resolver=DnsResolver(resolver), ssl=context)
    timeout = aiohttp.ClientTimeout(total=POST_TIMEOUT)
    try:
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session,
            session.post(url, data=body, headers={"Content-Type": GZIP_TYPE}, allow_redirects=False) as resp,
        ):
            if not 200 <= resp.status < 300:
                raise PostError(f"{url}: HTTP {resp.status}")
            return resp.status
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        raise PostError(f"{url}: {exc}") from exc


def report_message(
    report: dict[str, object], domain: str, day: date, sender: str, to: str, submitter: str
) -> bytes:
    """The report mail (§5.3): subject and headers naming the domain, submitter and report id, a human
    part, and the gzipped JSON as ``application/tlsrpt+gzip``."""
    start = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())
    filename = f"{submitter}!{domain}!{start}!{start + 86399}.json.gz"
    body = report_gzip(report)
    msg = MIMEMultipart("report", report_type="tlsrpt")
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = f"Report Domain: {domain} Submitter: {submitter} Report-ID: <{report['report-id']}>"
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2])
    msg["TLS-Report-Domain"] = domain
    msg["TLS-Report-Submitter"] = submitter
    msg.attach(MIMEText(f"The SMTP TLS report of {domain} for {day}, from {submitter}.\n", "plain", "utf-8"))
    part = MIMEApplication(body, "tlsrpt+gzip")
    part.add_header("Content-Disposition", "attachment", filename=filename)
    msg.attach(part)
    return msg.as_bytes(policy=SMTP)


class ReportSender:
    """The daily job: report every earlier day's counts to the domains that asked for reports."""

    def __init__(
        self,
        config: Callable[[], Config],
        store: TransportStore,
        queue: QueueStore,
        signer: Signer,
        resolver: dns.asyncresolver.Resolver,
    ) -> None:
        self._config = config
        self._store = store
        self._queue = queue
        self._signer = signer
        self._resolver = resolver
        self._ssl: tuple[Path | None, ssl.SSLContext] | None = None

    async def send_due(self, now: datetime) -> int:
        """Send the reports of the :data:`CATCH_UP_DAYS` days before ``now``'s that are not sent yet, and
        prune older counts and expired MTA-STS policies; return the reports sent (mails queued, POSTs
        answered 2xx)."""
        today = now.astimezone(UTC).date()
        sent = 0
        for back in range(CATCH_UP_DAYS, 0, -1):
            day = today - timedelta(days=back)
            by_domain: dict[str, list[TlsSessionCount]] = {}
            for c in await self._store.tls_sessions(day):
                by_domain.setdefault(c.domain, []).append(c)
            for domain, counts in sorted(by_domain.items()):
                sent += await self._report(domain, day, counts)
        await self._store.prune_tls_sessions(today - timedelta(days=CATCH_UP_DAYS))
        await self._store.prune_mta_sts(now)
        return sent

    async def _report(self, domain: str, day: date, counts: list[TlsSessionCount]) -> int:
        ruas = await self._ruas(domain)
        mailtos = [u[len("mailto:") :] for u in ruas if u.lower().startswith("mailto:")]
        posts = [u for u in ruas if u.lower().startswith("https://")]
        others = [u for u in ruas if u not in posts and not u.lower().startswith("mailto:")]
        if others:
            log.info(
                "TLS reporting: %s wants reports at %s; only mailto: and https: are sent", domain, others
            )
        if not mailtos and not posts:
            return 0
        if not await self._store.claim_tls_report(day, domain):
            return 0  # another node has sent it
        cfg = self._config()
        inbound = cfg.inbound.domains[0]
        sender = f"tlsrpt-noreply@{inbound}"
        report = report_json(counts, domain, day, cfg.server.hostname, f"postmaster@{inbound}")
        sent = 0
        for address in mailtos:
            address = address.split("?", 1)[0]  # a mailto: URI may carry header fields; the address is all
            data = report_message(report, domain, day, sender, address, cfg.server.hostname)
            if len(data) > MAX_REPORT_BYTES:
                log.warning("TLS reporting: report of %s for %s too large (%d bytes)", domain, day, len(data))
                metrics.TLSRPT_REPORTS.labels("mailto", "failed").inc()
                continue
            data = self._signer.sign(data, inbound) + data
            msg = NewMessage(new_queue_id(), REPORT_ACCOUNT, sender, (address,), data)
            await self._queue.enqueue(msg)
            metrics.TLSRPT_REPORTS.labels("mailto", "sent").inc()
            log.info("%s: TLS report of %s for %s queued to <%s>", msg.queue_id, domain, day, address)
            sent += 1
        body = report_gzip(report) if posts else b""
        if len(body) > MAX_REPORT_BYTES:
            log.warning("TLS reporting: report of %s for %s too large (%d bytes)", domain, day, len(body))
            metrics.TLSRPT_REPORTS.labels("https", "failed").inc(len(posts))
            posts = []
        for url in posts:
            try:
                status = await post_report(url, body, self._resolver, self._context(cfg))
            except PostError as exc:
                log.warning("TLS reporting: report of %s for %s not posted: %s", domain, day, exc)
                metrics.TLSRPT_REPORTS.labels("https", "failed").inc()
                continue
            metrics.TLSRPT_REPORTS.labels("https", "sent").inc()
            log.info("TLS report of %s for %s posted to %s (HTTP %d)", domain, day, url, status)
            sent += 1
        return sent

    def _context(self, cfg: Config) -> ssl.SSLContext:
        """The client context of a POST: verified against the system CA store or ``[delivery]
        tls_ca_file`` (as MTA-STS policy fetches are), TLS 1.2 or later."""
        ca_file = cfg.delivery.tls_ca_file
        if self._ssl is None or self._ssl[0] != ca_file:
            ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            self._ssl = (ca_file, ctx)
        return self._ssl[1]

    async def _ruas(self, domain: str) -> list[str]:
        try:
            answer = await self._resolver.resolve(f"_smtp._tls.{domain}", "TXT")
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            return []
        except dns.exception.DNSException as exc:
            log.info("TLS reporting: TXT lookup of _smtp._tls.%s failed: %s", domain, exc)
            return []
        return parse_rua(b"".join(r.strings).decode("ascii", "replace") for r in answer)

    async def run(self, stop: asyncio.Event, interval: float = SEND_INTERVAL) -> None:
        """:meth:`send_due` now and then every ``interval`` seconds until ``stop`` is set."""
        while not stop.is_set():
            try:
                await self.send_due(datetime.now(UTC))
            except StorageError as exc:
                log.error("TLS reporting failed (retried in %.0f s): %s", interval, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
