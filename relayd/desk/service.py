"""The postmaster's desk as the inbound listener sees it: one object, built once, told what came in.

The listener (:mod:`relayd.edge.smtp.inbound`) has already done what relayd does with a report (attribution,
suppression, events); it then tells the desk, which keeps what a person must see
(:mod:`relayd.desk.inbox`), forwards it when ``[inbound] postmaster_forward`` is set
(:mod:`relayd.desk.forward`), and reads DMARC aggregate reports sent to ``dmarc@``
(:mod:`relayd.reports.dmarc`, in a child process of its own with the report parser's time limit, since the
XML and the archives are attacker input as much as a bounce is).

Failure: a store error while keeping raises :class:`~relayd.core.errors.StorageError` (the listener answers
451 and the sender retries); a forward that cannot be queued is logged and the item stays in the inbox,
so that a full queue never makes a report come back twice. :class:`~relayd.reports.parseworker.ParserBusy`
propagates (451) like the report parser's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Protocol, cast

from relayd.config import Config
from relayd.core import metrics
from relayd.core.errors import StorageError
from relayd.desk import dmarcstats, forward, inbox
from relayd.desk.inbox import Kind
from relayd.queue.store import QueueStore
from relayd.reports.dmarc import DmarcReading, read_mail
from relayd.reports.parseworker import ParseAbandoned, ParseWorker
from relayd.store.models import Event
from relayd.store.protocols import DmarcStore, InboxStore

log = logging.getLogger(__name__)

__all__ = ["DMARC_PER_SOURCE_HOUR", "DMARC_TARGET", "Desk", "DeskStore"]

#: What the DMARC parse child runs.
DMARC_TARGET = "relayd.reports.dmarc:read_mail"
#: DMARC reports read per source address an hour: a reporter sends one per domain and day.
DMARC_PER_SOURCE_HOUR = 200
#: Recipient roles whose human-written mail is kept (RFC 2142: they must reach a person).
_PERSON_ROLES = frozenset({"abuse", "postmaster"})


class DeskStore(InboxStore, DmarcStore, Protocol):
    """The slices of the store the desk uses."""


class Desk:
    """Keeps, forwards and reads what comes to the postmaster; one per listening process."""

    def __init__(
        self,
        config: Callable[[], Config],
        store: DeskStore,
        queue: QueueStore,
        *,
        parse_timeout: float | None = None,
    ) -> None:
        """``config()`` is read per message (a reload applies to the next one). ``parse_timeout`` None
        reads DMARC reports in a thread of this process with no time limit (tests of the listener alone);
        the daemon passes ``[inbound] parse_timeout``."""
        self._config = config
        self.store = store
        self.queue = queue
        self.dmarc_parser = (
            ParseWorker(parse_timeout, target=DMARC_TARGET) if parse_timeout is not None else None
        )
        self._dmarc_hour: dict[str, tuple[int, int]] = {}  # source -> (hour, reports read in it)

    async def close(self) -> None:
        """Stop the DMARC parse child, if one was started."""
        if self.dmarc_parser is not None:
            await self.dmarc_parser.close()

    # -- the inbox ---------------------------------------------------------------------------------------

    async def after_report(
        self,
        role: str,
        raw: bytes,
        now: datetime,
        *,
        is_report: bool,
        events: Sequence[Event],
        source: str,
        mail_from: str,
    ) -> inbox.Kept | None:
        """After relayd acted on a message to ``role``: keep it when a person must read it (mail that is
        no report, to abuse@ or postmaster@; a report attributed to nobody). Returns what was kept."""
        if role in _PERSON_ROLES and not is_report:
            headers = inbox.headers_of(raw)
            kind = Kind.PROVIDER_NOTICE if inbox.automated(headers, mail_from) else Kind.COMPLAINT_TEXT
            return await self._keep(raw, kind, now, source=source, mail_from=mail_from)
        unattributed = [e for e in events if e.kind == "unattributed"]
        if unattributed:
            note = f"{role}: no token of ours ({unattributed[0].reason or 'report'})"
            return await self._keep(
                raw, Kind.UNATTRIBUTED_REPORT, now, source=source, mail_from=mail_from, note=note
            )
        return None

    async def unreadable(
        self, role: str, raw: bytes, why: str, now: datetime, *, source: str, mail_from: str
    ) -> inbox.Kept | None:
        """A report the parser gave up on (``why``: timeout, memory, crashed): kept for a person."""
        note = f"{role}: the parser gave up ({why})"
        return await self._keep(
            raw, Kind.UNREADABLE_REPORT, now, source=source, mail_from=mail_from, note=note
        )

    async def _keep(
        self, raw: bytes, kind: Kind, now: datetime, *, source: str, mail_from: str, note: str = ""
    ) -> inbox.Kept:
        kept = await inbox.keep(self.store, raw, kind, now, source=source, mail_from=mail_from, note=note)
        if kept.item is None:
            return kept
        metrics.INBOX_OPEN.set(await self.store.count_open_inbox())
        cfg = self._config()
        target = cfg.inbound.postmaster_forward
        if target and forward.should_forward(raw, mail_from):
            try:
                await forward.forward(
                    self.queue,
                    kept.item,
                    raw[: inbox.MAX_RAW],
                    to=target,
                    inbound=cfg.inbound.domains[0],
                    hostname=cfg.server.hostname,
                )
            except StorageError as exc:
                log.error("inbox item %d kept but not forwarded: %s", kept.item.id, exc)
        return kept

    # -- DMARC aggregate reports -------------------------------------------------------------------------

    async def on_dmarc(self, raw: bytes, now: datetime, *, source: str, mail_from: str) -> str:
        """Read, check and store a DMARC aggregate report mailed to ``dmarc@``; return the outcome
        (``stored``, ``replayed``, ``refused``, ``foreign_domain``, ``rate_limited``). A refused report is
        kept in the inbox (``unreadable-report``) with the reason, so an operator can tell a reporter's odd
        format from an attack. Raises StorageError, ParserBusy."""
        if not self._dmarc_allowed(source, now):
            log.info("dmarc: report from %s not read: over %d an hour", source, DMARC_PER_SOURCE_HOUR)
            return self._outcome("rate_limited")
        try:
            reading = await self._read(raw)
        except ParseAbandoned as exc:
            await self.unreadable("dmarc", raw, exc.why, now, source=source, mail_from=mail_from)
            return self._outcome("refused")
        report = reading.report
        if report is None:
            why = reading.refused or "unreadable"
            log.info("dmarc: report from %s refused: %s", source, why)
            note = f"dmarc report refused: {why}"
            await self._keep(raw, Kind.UNREADABLE_REPORT, now, source=source, mail_from=mail_from, note=note)
            return self._outcome("refused")
        cfg = self._config()
        domain = dmarcstats.report_domain(cfg, report.domain)
        if domain is None:
            log.info("dmarc: report from %s about %s, not a sending domain: ignored", source, report.domain)
            return self._outcome("foreign_domain")
        counts = dmarcstats.counts_of(report)
        if not await self.store.add_dmarc_report(report.org, report.report_id, domain, now, counts):
            log.info(
                "dmarc: report %s of %s for %s seen before: counted once",
                report.report_id,
                report.org,
                domain,
            )
            return self._outcome("replayed")
        own = dmarcstats.own_addresses(cfg)
        for c in counts:
            where = "own" if c.source_ip in own else "other"
            if c.dmarc_pass:
                metrics.DMARC_MESSAGES.labels(domain, where, "pass").inc(c.dmarc_pass)
            if c.total - c.dmarc_pass:
                metrics.DMARC_MESSAGES.labels(domain, where, "fail").inc(c.total - c.dmarc_pass)
        log.info(
            "dmarc: report %s of %s for %s stored: %d message(s) from %d source(s)",
            report.report_id,
            report.org,
            domain,
            sum(c.total for c in counts),
            len(counts),
        )
        return self._outcome("stored")

    def _dmarc_allowed(self, source: str, now: datetime) -> bool:
        """Count a report of ``source`` in this hour; False when it is one too many. Per process, in
        memory: the map is emptied when it holds many sources (a restart does the same)."""
        hour = int(now.timestamp()) // 3600
        seen_hour, count = self._dmarc_hour.get(source, (hour, 0))
        count = count + 1 if seen_hour == hour else 1
        if len(self._dmarc_hour) > 10_000:
            self._dmarc_hour.clear()
        self._dmarc_hour[source] = (hour, count)
        return count <= DMARC_PER_SOURCE_HOUR

    async def _read(self, raw: bytes) -> DmarcReading:
        if self.dmarc_parser is None:
            return await asyncio.to_thread(read_mail, raw)
        reading = cast(object, await self.dmarc_parser.parse(raw))
        if not isinstance(reading, DmarcReading):  # the child runs DMARC_TARGET; anything else is a bug
            raise ParseAbandoned("crashed")
        return reading

    @staticmethod
    def _outcome(outcome: str) -> str:
        metrics.DMARC_REPORTS.labels(outcome).inc()
        return outcome
