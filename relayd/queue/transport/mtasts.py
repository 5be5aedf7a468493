"""MTA-STS (RFC 8461): the TLS a receiving domain asks for when mail goes to its MX hosts.

A domain publishes TXT ``_mta-sts.<domain>`` (``v=STSv1; id=...``) and a policy at
``https://mta-sts.<domain>/.well-known/mta-sts.txt``: a mode, the MX host patterns, and how long to keep
it. With ``enforce`` mail goes only to MX hosts the policy names, over TLS whose certificate verifies for
that name; anything else is deferred with 4.7.5 (relayd.queue.transport.tlspolicy). With ``testing`` mail
goes as
without a policy, and what would have failed is counted. ``none`` switches a cached policy off.

How the policy is found (§5.1): the TXT id is looked up for each delivery (the resolver caches it for its
TTL); a cached policy with that id that has not expired is used as it is; otherwise the policy is fetched
again. A cached, unexpired policy also holds when the TXT record is gone or the fetch fails: an attacker
who can strip the record or block the HTTPS fetch must not turn ``enforce`` off (§10). Policies are
cached in the store (shared by every node, kept over restarts) and in memory.

The fetch (§3.3): certificate verified against ``mta-sts.<domain>`` (the system CA store, or ``[delivery]
tls_ca_file``), host name resolved through delivery's own resolver (``[delivery] nameservers``), no
redirects, 200 and ``text/plain`` only, at most :data:`MAX_POLICY_BYTES`, :data:`FETCH_TIMEOUT` in all. A
failed fetch is not retried for :data:`FETCH_RETRY` seconds: every recipient of a bulk send asks.

Only MX delivery looks policies up: routes and a smarthost use their configured level, so a machine without
outside DNS delivers to its routes without delay.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import dns.asyncresolver
import dns.exception
import dns.resolver

from relayd.core import metrics
from relayd.core.errors import StorageError
from relayd.queue.transport.dane import Tlsa
from relayd.queue.transport.tlspolicy import TlsLevel, unmet
from relayd.queue.transport.tlsrpt import PolicyRef, SessionCounter
from relayd.store.models import MtaStsRecord
from relayd.store.protocols import MtaStsCache

log = logging.getLogger(__name__)

#: RFC 8461 §3.3: "a maximum size of 64 KB".
MAX_POLICY_BYTES = 64 * 1024
#: RFC 8461 §3.2: max_age "up to 31557600" seconds (one year); larger values are capped.
MAX_AGE_CAP = 31_557_600
#: Seconds the whole policy fetch may take (§3.3 suggests "a short timeout": one minute at most).
FETCH_TIMEOUT = 20.0
#: Seconds a domain whose policy could not be fetched is not asked again.
FETCH_RETRY = 300.0
#: Domains whose policies are kept in memory at most (beyond it the memory cache starts afresh; the store
#: still has them).
_MEMORY_LIMIT = 50_000
#: Seconds a domain the store has no policy for is not asked about again (a policy fetched by this
#: process is seen at once; one fetched by another node from the next TXT id change or after this long).
_ABSENT_SECONDS = 60.0


class Mode(enum.Enum):
    ENFORCE = "enforce"
    TESTING = "testing"
    NONE = "none"


class PolicyError(ValueError):
    """A policy body that does not follow RFC 8461 §3.2."""


@dataclass(frozen=True, slots=True)
class Policy:
    mode: Mode
    mx: tuple[str, ...]
    max_age: int


def _is_id(value: str) -> bool:
    return 1 <= len(value) <= 32 and value.isascii() and value.isalnum()


def parse_txt(records: list[str]) -> str | None:
    """The policy id of the ``_mta-sts`` TXT records, or None when there is no single valid one.

    §3.1: records not starting with ``v=STSv1`` are ignored; more than one that does means no policy; the
    id is 1 to 32 letters and digits; other fields are ignored."""
    ours = [r for r in records if r.startswith("v=STSv1")]
    if len(ours) != 1:
        return None
    fields = [f.strip(" \t") for f in ours[0].split(";")]
    if fields[0] != "v=STSv1":
        return None
    for f in fields[1:]:
        key, eq, value = f.partition("=")
        if eq and key == "id":
            return value if _is_id(value) else None
    return None


def _valid_pattern(pattern: str) -> bool:
    """An MX pattern: a host name, or ``*.`` and a host name (§3.2, §4.1)."""
    name = pattern[2:] if pattern.startswith("*.") else pattern
    labels = name.split(".")
    return len(labels) >= 2 and all(
        0 < len(label) <= 63
        and label.isascii()
        and label.replace("-", "").isalnum()
        and not label.startswith("-")
        and not label.endswith("-")
        for label in labels
    )


def parse_policy(text: str) -> Policy:
    """Parse a policy body strictly; raise :class:`PolicyError` naming the first problem.

    §3.2: ``key: value`` lines (CRLF; a bare LF is taken too, as the RFC's own examples are often served),
    ``version: STSv1``, ``mode`` one of enforce/testing/none, ``max_age`` digits only (capped at
    :data:`MAX_AGE_CAP`), one or more ``mx`` unless the mode is none. Unknown keys are ignored; of a key
    given twice (but ``mx``) the first counts. Linear in the size of the body."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for raw in text.split("\n"):
        line = raw.removesuffix("\r")
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        if not colon:
            raise PolicyError(f"not a 'key: value' line: {line[:80]!r}")
        key, value = key.strip(" \t"), value.strip(" \t")
        if key == "mx":
            pattern = value.lower().rstrip(".")
            if not _valid_pattern(pattern):
                raise PolicyError(f"bad mx pattern {value[:80]!r}")
            mx.append(pattern)
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise PolicyError("version is not STSv1")
    try:
        mode = Mode(fields.get("mode", ""))
    except ValueError:
        raise PolicyError(f"bad mode {fields.get('mode', '')[:20]!r}") from None
    age = fields.get("max_age", "")
    if not (age.isascii() and age.isdigit() and len(age) <= 10):
        raise PolicyError(f"bad max_age {age[:20]!r}")
    if mode is not Mode.NONE and not mx:
        raise PolicyError("no mx in a policy that is not 'none'")
    return Policy(mode, tuple(mx), min(int(age), MAX_AGE_CAP))


def mx_matches(pattern: str, host: str) -> bool:
    """§4.1: a pattern is the host name itself, or ``*.`` followed by what the host name is below
    exactly one leftmost label (``*.example.com`` matches ``mx.example.com``, not ``example.com`` nor
    ``a.b.example.com``)."""
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        suffix = pattern[1:]
        head = host[: -len(suffix)]
        return host.endswith(suffix) and bool(head) and "." not in head
    return host == pattern


def policy_matches(record: MtaStsRecord, host: str) -> bool:
    return any(mx_matches(p, host) for p in record.mx)


class FetchError(Exception):
    """The policy could not be fetched (network, TLS, HTTP status, type or size)."""


@dataclass(frozen=True, slots=True)
class Plan:
    """How one delivery goes: to ``hosts`` (named ``names``) at ``level``; ``fallback`` is the level to
    send at when ``level`` is not met (``testing``: deliver anyway, and count the failure); hosts whose
    name has ``tlsa`` records get DANE instead (relayd.queue.transport.dane)."""

    hosts: tuple[tuple[str, int], ...]
    names: tuple[str, ...]
    level: TlsLevel
    fallback: TlsLevel | None = None
    mode: Mode | None = None  # the MTA-STS mode that shaped the plan, None: no policy
    tlsa: Mapping[str, tuple[Tlsa, ...]] = field(default_factory=dict)
    #: hosts (by name) whose level is not ``level``: those with a validated TLSA RRset of no usable
    #: record get ``encrypt`` (RFC 7672 §2.2)
    levels: Mapping[str, TlsLevel] = field(default_factory=dict)
    #: the policy TLS reporting counts the sessions under (None: no policy, nothing counted)
    ref: PolicyRef | None = None


class MtaSts:
    """The policies of recipient domains, cached in the store and in memory."""

    def __init__(
        self,
        cache: MtaStsCache,
        resolver: dns.asyncresolver.Resolver,
        *,
        ca_file: Path | None = None,
        clock: Callable[[], float] = time.time,
        sessions: SessionCounter | None = None,
    ) -> None:
        self._cache = cache
        self._sessions = sessions
        self._resolver = resolver
        self._ca_file = ca_file
        self._clock = clock
        self._memory: dict[str, MtaStsRecord] = {}
        self._absent: dict[str, float] = {}  # domain -> until when the store is known to have no policy
        self._failed: dict[str, tuple[str, float]] = {}  # domain -> (policy id, retry after)
        self._locks: dict[str, asyncio.Lock] = {}
        self._ssl: ssl.SSLContext | None = None

    async def policy(self, domain: str) -> MtaStsRecord | None:
        """The policy in force for ``domain``, None when it has none (or only an expired one)."""
        domain = domain.lower().rstrip(".")
        policy_id = await self._policy_id(domain)
        cached = await self._cached(domain)
        if policy_id is None or (cached is not None and cached.policy_id == policy_id):
            return cached
        failed = self._failed.get(domain)
        if failed is not None and failed[0] == policy_id and self._clock() < failed[1]:
            return cached
        lock = self._locks.setdefault(domain, asyncio.Lock())
        async with lock:
            cached = await self._cached(domain)  # fetched by another delivery while this one waited
            if cached is not None and cached.policy_id == policy_id:
                return cached
            return await self._refresh(domain, policy_id, cached)

    async def plan(
        self, domain: str, hosts: tuple[tuple[str, int], ...], names: tuple[str, ...], level: TlsLevel
    ) -> Plan:
        """Apply the policy of ``domain`` to its MX hosts. ``enforce``: only hosts whose MX name matches,
        verified against it; none left is a 4.7.5 deferral. ``testing``: every host, verification tried
        first, ``level`` when it fails. No policy or ``none``: as configured."""
        record = await self.policy(domain)
        mode = Mode(record.mode) if record is not None else None
        if record is None or mode is Mode.NONE:
            return Plan(hosts, names, level)
        assert mode is not None
        ref = _policy_ref(record)
        matching = [i for i, name in enumerate(names) if policy_matches(record, name)]
        if mode is Mode.ENFORCE:
            if not matching:
                count(mode, "mx_mismatch")
                host, port = hosts[0] if hosts else (domain, 25)
                if self._sessions is not None:  # no session was made: the delivery counts as one failed
                    self._sessions.session(ref, names[0] if names else domain, host, "validation-failure")
                raise unmet(TlsLevel.VERIFY, host, port, f"no MX host of {domain} matches its MTA-STS policy")
            kept = tuple(hosts[i] for i in matching), tuple(names[i] for i in matching)
            return Plan(*kept, TlsLevel.VERIFY, mode=mode, ref=ref)
        if len(matching) < len(names):
            count(mode, "mx_mismatch")
        if level is TlsLevel.VERIFY:
            return Plan(hosts, names, level, mode=mode, ref=ref)
        return Plan(hosts, names, TlsLevel.VERIFY, fallback=level, mode=mode, ref=ref)

    async def _policy_id(self, domain: str) -> str | None:
        try:
            answer = await self._resolver.resolve(f"_mta-sts.{domain}", "TXT")
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            return None
        except dns.exception.DNSException as exc:
            log.info("MTA-STS: TXT lookup for %s failed (%s); a cached policy is kept", domain, exc)
            return None
        records = [b"".join(r.strings).decode("ascii", "replace") for r in answer]
        return parse_txt(records)

    async def _cached(self, domain: str) -> MtaStsRecord | None:
        """The unexpired policy of ``domain`` from memory or the store."""
        now = datetime.fromtimestamp(self._clock(), UTC)
        record = self._memory.get(domain)
        if record is None:
            if self._clock() < self._absent.get(domain, 0.0):
                return None  # the store had none a moment ago: most domains have no policy at all
            try:
                record = await self._cache.get_mta_sts(domain)
            except StorageError as exc:
                log.warning("MTA-STS: reading the cached policy of %s failed: %s", domain, exc)
                return None
            if record is not None:
                self._remember(record)
            else:
                if len(self._absent) >= _MEMORY_LIMIT:
                    self._absent.clear()
                self._absent[domain] = self._clock() + _ABSENT_SECONDS
        if record is None or record.expires_at <= now:
            return None
        return record

    def _remember(self, record: MtaStsRecord) -> None:
        if len(self._memory) >= _MEMORY_LIMIT:
            self._memory.clear()
        self._memory[record.domain] = record
        self._absent.pop(record.domain, None)

    async def _refresh(self, domain: str, policy_id: str, cached: MtaStsRecord | None) -> MtaStsRecord | None:
        try:
            policy = parse_policy(await self._fetch(domain))
        except (FetchError, PolicyError) as exc:
            log.warning("MTA-STS: policy of %s (id %s) not fetched: %s", domain, policy_id, exc)
            metrics.MTA_STS_FETCHES.labels("failed").inc()
            self._failed[domain] = (policy_id, self._clock() + FETCH_RETRY)
            return cached
        metrics.MTA_STS_FETCHES.labels("ok").inc()
        self._failed.pop(domain, None)
        now = datetime.fromtimestamp(self._clock(), UTC)
        record = MtaStsRecord(domain, policy_id, policy.mode.value, policy.mx, policy.max_age, now)
        log.info(
            "MTA-STS: policy of %s: id=%s mode=%s mx=%s max_age=%d",
            domain,
            policy_id,
            policy.mode.value,
            ",".join(policy.mx),
            policy.max_age,
        )
        self._remember(record)
        try:
            await self._cache.put_mta_sts(record)
        except StorageError as exc:
            log.warning("MTA-STS: caching the policy of %s failed: %s", domain, exc)
        return record

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            ctx = ssl.create_default_context(cafile=str(self._ca_file) if self._ca_file else None)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            self._ssl = ctx
        return self._ssl

    async def _fetch(self, domain: str) -> str:
        return await fetch_policy(domain, self._resolver, self._context())


async def fetch_policy(domain: str, resolver: dns.asyncresolver.Resolver, context: ssl.SSLContext) -> str:
    """The policy text of ``domain`` from ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` (§3.3):
    ``context`` verifies the certificate, ``resolver`` finds the host; no redirects, 200 and
    ``text/plain`` only, at most :data:`MAX_POLICY_BYTES`, :data:`FETCH_TIMEOUT` in all. Raises
    :class:`FetchError`. Also what ``relayd check-config --dns`` fetches the inbound domain's policy with."""
    url = f"https://mta-sts.{domain}/.well-known/mta-sts.txt"
    import aiohttp  # here: a delivery process that never fetches a policy does not load it

    from relayd.queue.transport.httpresolver import DnsResolver

    connector = aiohttp.TCPConnector(resolver=DnsResolver(resolver), ssl=context)
    timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
    try:
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session,
            session.get(url, allow_redirects=False) as resp,
        ):
            if resp.status != 200:
                raise FetchError(f"{url}: HTTP {resp.status}")  # a redirect too (§3.3)
            if resp.content_type != "text/plain":
                raise FetchError(f"{url}: Content-Type {resp.content_type}, not text/plain")
            body = await resp.content.read(MAX_POLICY_BYTES + 1)
            while len(body) <= MAX_POLICY_BYTES:
                more = await resp.content.read(MAX_POLICY_BYTES + 1 - len(body))
                if not more:
                    break
                body += more
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise FetchError(f"{url}: {exc}") from exc
    if len(body) > MAX_POLICY_BYTES:
        raise FetchError(f"{url}: policy larger than {MAX_POLICY_BYTES} bytes")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FetchError(f"{url}: not UTF-8") from exc


def _policy_ref(record: MtaStsRecord) -> PolicyRef:
    """The policy as TLS reports quote it (RFC 8460 §4.4: the policy's lines, and its MX patterns)."""
    lines = ("version: STSv1", f"mode: {record.mode}", *(f"mx: {p}" for p in record.mx))
    return PolicyRef(record.domain, "sts", (*lines, f"max_age: {record.max_age}"), record.mx)


def count(mode: Mode, result: str) -> None:
    """``relayd_mta_sts_total{mode, result}``: ok, mx_mismatch, tls_failed (closed sets)."""
    metrics.MTA_STS_RESULTS.labels(mode.value, result).inc()
