"""Prometheus metrics: what an operator alerts on.

All metric families live here, in one registry, so ``/metrics`` shows exactly relayd's own families (no
process collector surprises in tests) and ``conf/alerts.yml`` can be checked against this list.

Label sets are bounded: destination domains get their own label value only for the first
``_MAX_DOMAINS`` distinct domains seen (the big mailbox providers come first in practice), the rest are
``other``; accounts are bounded by the config. Reasons and outcomes are closed enums.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from relayd.core.models import Event

REGISTRY = CollectorRegistry(auto_describe=True)

SUBMISSIONS = Counter(
    "relayd_submissions_total",
    "Messages at the end of DATA on the submission listener, by outcome and reason",
    ["outcome", "reason"],
    registry=REGISTRY,
)
RECIPIENTS_DROPPED = Counter(
    "relayd_recipients_dropped_total",
    "Recipients refused or dropped by policy, by reason (suppressed:<reason>, discard, spamtrap, cap, ...)",
    ["reason"],
    registry=REGISTRY,
)
DELIVERIES = Counter(
    "relayd_deliveries_total",
    "Delivery attempts by outcome (delivered, deferred, bounced, expired, dropped) and destination domain",
    ["outcome", "domain"],
    registry=REGISTRY,
)
DSN_RECEIVED = Counter(
    "relayd_dsn_received_total",
    "Bounce reports received on the inbound listener, by kind (hard, soft, delay, other) and attribution",
    ["kind", "attributed"],
    registry=REGISTRY,
)
ARF_RECEIVED = Counter(
    "relayd_arf_received_total",
    "Complaint reports received, by feedback type and attribution",
    ["feedback_type", "attributed"],
    registry=REGISTRY,
)
SUPPRESSIONS_ADDED = Counter(
    "relayd_suppressions_added_total",
    "Suppression entries added by relayd (not by import), by reason and scope",
    ["reason", "scope"],
    registry=REGISTRY,
)
SUSPENSIONS = Counter(
    "relayd_account_suspensions_total",
    "Accounts suspended by relayd or an operator",
    ["account", "reason"],
    registry=REGISTRY,
)
ACCOUNT_SENT = Counter(
    "relayd_account_sent_total",
    "Recipients accepted for delivery, per account and message class (bulk, transactional)",
    ["account", "class"],
    registry=REGISTRY,
)
ACCOUNT_BOUNCES = Counter(
    "relayd_account_bounces_total",
    "Bounces attributed to an account, by type (hard, soft, block)",
    ["account", "type"],
    registry=REGISTRY,
)
ACCOUNT_COMPLAINTS = Counter(
    "relayd_account_complaints_total", "Complaints attributed to an account", ["account"], registry=REGISTRY
)
SHAPING_POSTPONED = Counter(
    "relayd_shaping_postponed_total",
    "Recipients postponed by traffic shaping (no SMTP traffic), by destination and reason",
    ["destination", "reason"],
    registry=REGISTRY,
)
SHAPING_SLOWDOWNS = Counter(
    "relayd_shaping_slowdowns_total",
    "Times a destination asked us to slow down (421, 4.7.x throttling) and the rate was cut",
    ["destination"],
    registry=REGISTRY,
)
IP_SUSPENSIONS = Counter(
    "relayd_ip_suspensions_total",
    "Source addresses suspended for a destination after a block reply",
    ["destination", "source"],
    registry=REGISTRY,
)
SUSPENDED_SOURCES = Gauge(
    "relayd_shaping_suspended_sources",
    "Source addresses currently suspended, by destination",
    ["destination"],
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
QUEUE_RECIPIENTS = Gauge(
    "relayd_queue_recipients",
    "Recipients in the queue by state",
    ["state"],
    registry=REGISTRY,
    multiprocess_mode="livesum",  # each worker reports its own queue shard
)
QUEUE_OLDEST = Gauge(
    "relayd_queue_oldest_age_seconds",
    "Age of the oldest message with a recipient still queued",
    registry=REGISTRY,
    multiprocess_mode="livemax",
)
SUPPRESSION_ENTRIES = Gauge(
    "relayd_suppression_entries",
    "Suppression entries in the store",
    registry=REGISTRY,
    multiprocess_mode="livemax",
)
INBOX_OPEN = Gauge(
    "relayd_inbox_open_items",
    "Postmaster inbox items not yet marked done (relayd inbox list --state open)",
    registry=REGISTRY,
    multiprocess_mode="livemax",
)
DMARC_REPORTS = Counter(
    "relayd_dmarc_reports_total",
    "DMARC aggregate reports received at dmarc@, by outcome (stored, replayed, refused, foreign_domain,"
    " rate_limited)",
    ["outcome"],
    registry=REGISTRY,
)
DMARC_MESSAGES = Counter(
    "relayd_dmarc_messages_total",
    "Messages counted in stored DMARC aggregate reports, by sending domain (configured domains only),"
    " source (own: relayd's pool addresses; other) and DMARC result (pass: SPF or DKIM aligned; fail)",
    ["domain", "source", "result"],
    registry=REGISTRY,
)
DATA_BUDGET_REFUSALS = Counter(
    "relayd_smtp_data_budget_refusals_total",
    "Messages answered 452 4.3.1 because the process held [server] max_data_in_flight bytes of DATA",
    registry=REGISTRY,
)
TLS_FALLBACKS = Counter(
    "relayd_tls_fallback_total",
    "Outbound STARTTLS handshakes that failed, after which the host gets plaintext for a while, by reason",
    ["reason"],  # tls_error, refused, timeout, closed, other: a closed set
    registry=REGISTRY,
)
DELIVERY_TLS = Counter(
    "relayd_delivery_tls_total",
    "Outgoing SMTP connections by TLS level (none, may, encrypt, verify) and result (tls, plaintext;"
    " not_offered, failed: the level was not met and the delivery deferred)",
    ["level", "result"],
    registry=REGISTRY,
)
MTA_STS_RESULTS = Counter(
    "relayd_mta_sts_total",
    "MX deliveries under an MTA-STS policy by mode (enforce, testing) and result (ok; mx_mismatch,"
    " tls_failed: deferred under enforce, delivered anyway under testing)",
    ["mode", "result"],
    registry=REGISTRY,
)
TLSRPT_SESSIONS = Counter(
    "relayd_tlsrpt_sessions_total",
    "TLS sessions to MX hosts under a policy, as TLS reports count them, by policy type (sts, tlsa) and"
    " result (success, or an RFC 8460 result type)",
    ["policy", "result"],
    registry=REGISTRY,
)
TLSRPT_REPORTS = Counter(
    "relayd_tlsrpt_reports_total",
    "Daily TLS reports (RFC 8460) by rua method (mailto, https) and result (sent: queued, or POSTed and"
    " answered 2xx; failed: too large, or the POST failed)",
    ["method", "result"],
    registry=REGISTRY,
)
MTA_STS_FETCHES = Counter(
    "relayd_mta_sts_fetches_total",
    "MTA-STS policy fetches (a new policy id, or none cached) by result (ok, failed)",
    ["result"],
    registry=REGISTRY,
)
ACCEPT_SECONDS = Histogram(
    "relayd_smtp_accept_seconds",
    "Time from the end of DATA to the 250 (policy, signing and the durable commit)",
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    registry=REGISTRY,
)
DELIVERY_SECONDS = Histogram(
    "relayd_delivery_seconds",
    "Time of one delivery attempt (routing, connection, SMTP transaction)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
DKIM_SECONDS = Histogram(
    "relayd_dkim_sign_seconds",
    "Time to DKIM-sign one rendered message (all its signatures)",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05),
    registry=REGISTRY,
)

_MAX_DOMAINS = 20
_domains: set[str] = set()
_lock = threading.Lock()


def domain_label(domain: str) -> str:
    """The domain itself for the first few distinct domains, ``other`` after that (bounded cardinality)."""
    domain = domain.lower()
    if domain in _domains:
        return domain
    with _lock:
        if len(_domains) < _MAX_DOMAINS:
            _domains.add(domain)
            return domain
    return "other"


def exposition() -> tuple[bytes, str]:
    """The text format body and its content type, for ``GET /metrics``.

    With several workers (``PROMETHEUS_MULTIPROC_DIR`` set by ``relayd serve``) every worker writes its
    samples to files there, and whichever worker answers the scrape adds them all up."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


_BOUNCE_TYPES = {"hard_bounce": "hard", "soft_bounce": "soft", "bounce": "block"}


def observe_events(events: Iterable[Event]) -> None:
    """Count what feedback and policy effects did, from their events (one mapping, one place)."""
    for ev in events:
        evidence = _evidence(ev)
        via_report = evidence.get("report") not in (None, "smtp")
        if ev.kind in _BOUNCE_TYPES:
            ACCOUNT_BOUNCES.labels(ev.account or "-", _BOUNCE_TYPES[ev.kind]).inc()
            if via_report:
                DSN_RECEIVED.labels(_BOUNCE_TYPES[ev.kind], "yes").inc()
        elif ev.kind in ("delayed", "delivered", "autoreply"):
            DSN_RECEIVED.labels("other", "yes").inc()
        elif ev.kind == "complaint":
            ACCOUNT_COMPLAINTS.labels(ev.account or "-").inc()
            ARF_RECEIVED.labels(str(evidence.get("feedback_type") or "abuse"), "yes").inc()
        elif ev.kind == "unattributed":
            if ev.reason == "arf":
                ARF_RECEIVED.labels(str(evidence.get("feedback_type") or "unknown"), "no").inc()
            else:
                DSN_RECEIVED.labels("other", "no").inc()
        elif ev.kind == "suppressed":
            SUPPRESSIONS_ADDED.labels(ev.reason or "-", str(evidence.get("scope") or "global")).inc()
        elif ev.kind == "unsubscribed":
            SUPPRESSIONS_ADDED.labels("unsubscribe", "list" if ev.list else "account").inc()
        elif ev.kind == "suspended":
            SUSPENSIONS.labels(ev.account or "-", ev.reason or "-").inc()


def _evidence(ev: Event) -> dict[str, object]:
    try:
        value = json.loads(ev.evidence or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
