"""The sections of relayd.toml as frozen pydantic models (server, listeners, store, queue, delivery, policy,
DKIM keys, accounts, pools, shaping), and :class:`Config`, the whole file.

Each key's default and the reason for it sit beside the key (Postfix's mail_params.h habit); checks that
need the filesystem are made by :mod:`relayd.config.loading`, once the schema has validated.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import typing
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from relayd.config.values import Duration, HostPort, Network, Rate, RateLimit, Size, domain_key, ip_text
from relayd.core import passwords
from relayd.core.address import AddressError, normalize

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Model):
    hostname: str = Field(default_factory=socket.getfqdn)
    secret_file: Path = Path("var/secret.key")
    feedback_sender_id: str = Field(default="relayd", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    log_format: Literal["text", "json"] = "text"
    workers: int = Field(default=1, ge=1, le=64)
    #: with workers > 1, how much lower the CPU priority of the delivery processes is than that of the
    #: accepting ones (nice(2) increment; relayd.queue.handoff says why)
    delivery_nice: int = Field(default=10, ge=0, le=19)
    #: bytes of message data all SMTP sessions of one process may hold in memory at once (DATA is kept in
    #: memory until its reply); a message that would pass it gets 452 4.3.1 and is retried by its client
    max_data_in_flight: Size = Field(default=256_000_000, ge=1)


#: What a DATA line ending in a bare LF gets (``[submission]``/``[inbound] bare_newline``).
BareNewline = Literal["normalize", "reject"]


class SubmissionConfig(_Model):
    listen: list[HostPort] = ["127.0.0.1:2525"]
    max_message_size: Size = 25_000_000
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: implicit TLS (RFC 8314 §3.3, port 465): TLS from the first byte, with tls_cert/tls_key
    listen_tls: list[HostPort] = []
    auth_required: bool = True
    plaintext_auth: Literal["loopback", "never"] = "loopback"
    max_recipients: int = Field(default=1000, ge=1)
    max_connections: int = Field(default=1000, ge=1)
    max_connections_per_ip: int = Field(default=100, ge=1)
    max_sessions_per_account: int = Field(default=200, ge=1)
    command_timeout: Duration = 300.0
    data_timeout: Duration = 600.0
    # hostile clients: protocol errors per session, then 421 (Postfix's smtpd_hard_error_limit)
    max_errors: int = Field(default=20, ge=1)
    # failed AUTH: growing delay before each 535, then 421 per client and a lockout per account name
    auth_failure_delay: Duration = 1.0
    auth_failure_window: Duration = 600.0
    auth_max_failures: int = Field(default=5, ge=1)
    auth_account_max_failures: int = Field(default=20, ge=1)
    #: a DATA line ending in a bare LF: taken as CRLF ("normalize", Postfix 3.9's default; smtplib's
    #: sendmail with msg.as_bytes() sends such lines) or the message refused 554 5.5.2 ("reject"). Only
    #: CRLF.CRLF ends the data either way, and a bare CR is always refused.
    bare_newline: BareNewline = "normalize"

    @field_validator("listen_tls")
    @classmethod
    def _tls_listener_has_cert(cls, v: list[str], info: ValidationInfo) -> list[str]:
        # declared after tls_cert/tls_key, so those are in info.data when they validated
        if v and any(info.data.get(key, False) is None for key in ("tls_cert", "tls_key")):
            raise ValueError("implicit TLS needs a certificate: set tls_cert and tls_key")
        return v

    @model_validator(mode="after")
    def _tls_pair(self) -> SubmissionConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be set together")
        return self


class InboundConfig(_Model):
    listen: list[HostPort] = ["127.0.0.1:2526"]
    domains: list[str] = ["bounces.example.test"]
    max_message_size: Size = 10_000_000
    # messages (MAIL commands) per client address, then 421 4.7.0
    rate_per_ip: RateLimit = Rate(600, 60.0)
    # anyone on the internet may connect here: limits of its own, well below submission's
    max_connections: int = Field(default=200, ge=1)
    max_connections_per_ip: int = Field(default=10, ge=1)
    # the greeting is "220-", then "220 " this much later; a client talking before it ends is refused
    # (postscreen's pregreet test); 0 checks only at the greeting
    greet_wait: Annotated[Duration, Field(le=30)] = 1.0
    # how long the report parser child (relayd.reports.parseworker) may take over one report before it is
    # killed
    parse_timeout: Annotated[Duration, Field(gt=0)] = 10.0
    # a bounce or complaint about a copy sent longer ago than this is kept as an event and acts on nobody
    # (no suppression, no rate); the sent ledger, and so every token, is forgotten after it
    report_max_age: Annotated[Duration, Field(gt=0)] = 30 * 86400.0
    #: as [submission] bare_newline, for mail arriving here
    bare_newline: BareNewline = "normalize"
    #: STARTTLS on the inbound listener (TLS 1.2+, as submission), so bounces and reports can come back
    #: encrypted; re-read on SIGHUP. Without them no STARTTLS is offered.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: the postmaster inbox (relayd.desk): each kept message is forwarded to this address through the
    #: queue with a null return path; never an address at an inbound domain (it would come back)
    postmaster_forward: str | None = None
    #: inbox items, open or done, and DMARC aggregate counts are pruned after this
    keep_inbox: Annotated[Duration, Field(gt=0)] = 90 * 86400.0

    @field_validator("domains")
    @classmethod
    def _lower(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one inbound domain is needed (it is the VERP return-path domain)")
        return [d.lower().rstrip(".") for d in v]

    @field_validator("postmaster_forward")
    @classmethod
    def _forward_address(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return None
        try:
            address = normalize(v)
        except AddressError as exc:
            raise ValueError(f"not a mail address: {exc}") from None
        if address.rpartition("@")[2] in (info.data.get("domains") or ()):
            raise ValueError(f"{address} is at an inbound domain of relayd: the forward would come back")
        return address

    @model_validator(mode="after")
    def _tls_pair(self) -> InboundConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be set together")
        return self


class HttpConfig(_Model):
    listen: HostPort = "127.0.0.1:8025"
    public_url: str = "http://127.0.0.1:8025"
    # requests per client address to /u/ and /c/, then 429
    rate_per_ip: RateLimit = Rate(300, 60.0)
    # client networks that may read /metrics (account names and volumes); everyone else gets 403
    metrics_allow: list[Network] = Field(
        default_factory=lambda: [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
    )
    # the tenant API under /api/v1 (relayd.edge.web.api): off unless asked for, so that a listener serving
    # public unsubscribe pages does not grow an authenticated surface nobody uses
    api: bool = False
    # requests per API key, then 429 (requests without a valid key count against rate_per_ip)
    api_rate: RateLimit = Rate(600, 60.0)


class StoreConfig(_Model):
    backend: Literal["sqlite", "postgresql"] = "sqlite"
    path: Path = Path("var/relayd.db")
    dsn: str | None = None
    # events older than this are pruned (hourly); never before [inbound] report_max_age, whose repeats
    # they recognise
    keep_events: Annotated[Duration, Field(gt=0)] = 90 * 86400.0

    @model_validator(mode="after")
    def _dsn_for_pg(self) -> StoreConfig:
        if self.backend == "postgresql" and not self.dsn:
            raise ValueError("backend 'postgresql' needs dsn = 'postgresql://...'")
        return self


class QueueConfig(_Model):
    path: Path = Path("var/queue")
    retry_schedule: list[Duration] = Field(default=[60.0, 300.0, 900.0, 3600.0, 14400.0], min_length=1)
    max_age: Duration = 5 * 86400.0
    keep_finished: Duration = 86400.0
    active_limit: int = Field(default=2000, ge=1)
    scan_interval: Duration = 1.0
    # Postfix's queue_minfree: below this much free space on the queue's filesystem new mail is refused
    # with 452 4.3.1, so what is left goes to recording deliveries already in the queue (0: no check)
    min_free_space: Size = 50_000_000


#: The TLS levels of delivery (relayd.queue.transport.tlspolicy says what each one means).
TlsLevelName = Literal["none", "may", "encrypt", "verify"]


class DeliveryConfig(_Model):
    mode: Literal["mx", "smarthost", "routes"] = "mx"
    smarthost: HostPort | None = None
    routes: dict[str, HostPort] = {}
    port: int = Field(default=25, ge=1, le=65535)
    concurrency: int = Field(default=200, ge=1)
    connections_per_destination: int = Field(default=20, ge=1)
    messages_per_connection: int = Field(default=100, ge=1)
    connect_timeout: Duration = 30.0
    command_timeout: Duration = 300.0
    #: TLS level of delivery (relayd.queue.transport.tlspolicy): none, may (opportunistic), encrypt (STARTTLS
    #: required, nothing verified), verify (chain and host name verified); [tls_policy] overrides it
    tls: TlsLevelName = "may"
    #: PEM CA bundle that "verify" trusts instead of the system CA store (a private CA; tests)
    tls_ca_file: Path | None = None
    #: look up and apply recipient domains' MTA-STS policies (RFC 8461) on MX delivery
    #: (relayd.queue.transport.mtasts)
    mta_sts: bool = True
    helo: str | None = None
    nameservers: list[HostPort] = []
    # per-destination traffic shaping defaults ([shaping.NAME] sections in their own TOML file, e.g. the
    # shipped conf/shaping.toml); inline [shaping.NAME] sections override it key by key
    shaping_file: Path | None = None

    @model_validator(mode="after")
    def _mode_needs(self) -> DeliveryConfig:
        if self.mode == "smarthost" and not self.smarthost:
            raise ValueError("mode 'smarthost' needs smarthost = 'host:port'")
        if self.mode == "routes" and not self.routes:
            raise ValueError("mode 'routes' needs at least one entry in routes")
        return self


class ThresholdsConfig(_Model):
    window: Duration = 30 * 86400.0
    minimum_sent: int = Field(default=1000, ge=0)
    complaint_warn: float = Field(default=0.001, ge=0, le=1)
    complaint_suspend: float = Field(default=0.002, ge=0, le=1)
    hard_bounce_suspend: float = Field(default=0.05, ge=0, le=1)
    spamtrap_suspend: int = Field(default=1, ge=0)


class PolicyConfig(_Model):
    discard_patterns: list[str] = []
    spamtraps: list[str] = []
    soft_bounce_limit: int = Field(default=3, ge=1)
    soft_bounce_window: Duration = 30 * 86400.0
    thresholds: ThresholdsConfig = ThresholdsConfig()


class DkimConfig(_Model):
    domain: str
    selector: str
    key_file: Path
    algorithm: Literal["rsa", "ed25519"] = "rsa"


class CapsConfig(_Model):
    day: int | None = Field(default=None, ge=0)
    week: int | None = Field(default=None, ge=0)
    month: int | None = Field(default=None, ge=0)


class ListConfig(_Model):
    caps: CapsConfig = CapsConfig()
    require_consent: bool = False
    # where the confirm page sends the browser (303) after recording consent; None: relayd's own done page
    # (a plain host name or address, so the confirm page's CSP can allow exactly that origin as form-action)
    redirect: str | None = Field(
        default=None, pattern=r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?([/?#][\x21-\x7e]*)?$", max_length=2000
    )


WebhookEvent = Literal[
    "delivered",
    "deferred",
    "bounced",
    "expired",
    "complained",
    "unsubscribed",
    "suppressed",
    "dropped",
    "suspended",
    "held",
    "released",
    "retried",
    # changes made through the tenant API (relayd.edge.web.api)
    "unsuppressed",
    "imported",
    "consented",
]
WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = typing.get_args(WebhookEvent)


class WebhookConfig(_Model):
    """One endpoint that gets the account's events as signed JSON POSTs (at-least-once)."""

    url: str = Field(pattern=r"^https?://")
    secret_file: Path
    events: list[WebhookEvent] = list(WEBHOOK_EVENTS)


class AccountConfig(_Model):
    password_hash: str | None = None
    password_file: Path | None = None
    domains: list[str] = Field(min_length=1)
    imprint: str = ""
    networks: list[Network] = []
    signing_domain: str | None = None
    pool: str | None = None
    lists: dict[str, ListConfig] = {}
    discard_patterns: list[str] = []
    webhooks: list[WebhookConfig] = []
    #: subdomains of ``domains`` are the account's too (MAIL FROM, the header From and Sender, DKIM d=)
    allow_subdomains: bool = False
    #: the account may mark mail ``X-Relayd-Class: transactional`` (relayd.policy.rules.messageclass): no
    #: unsubscribe link, not held back by unsubscribes, caps or consent. Off by default: an account that
    #: could set it on its newsletter would escape every unsubscribe.
    transactional: bool = False

    @field_validator("domains")
    @classmethod
    def _lower(cls, v: list[str]) -> list[str]:
        return [domain_key(d) for d in v]

    def sends_as(self, domain: str) -> bool:
        """Whether ``domain`` is one of this account's sending domains (or, with ``allow_subdomains``,
        below one of them).

        The one answer to "may this account use this domain" for the envelope sender and the header
        From and Sender alike: a check made in two places drifts apart, and the header is what DMARC and
        the reader see, so it must be held to the same rule as the envelope."""
        key = domain_key(domain)
        if key in self.domains:
            return True
        return self.allow_subdomains and any(key.endswith("." + d) for d in self.domains)

    @field_validator("password_hash")
    @classmethod
    def _hash(cls, v: str | None) -> str | None:
        # format, bounded parameters and decodable parts now, not at the first AUTH: a hash whose
        # parameters are absurd would cost every login gigabytes, a broken one would refuse every login
        if v is not None:
            passwords.parse_hash(v)
        return v

    @model_validator(mode="after")
    def _credentials(self) -> AccountConfig:
        if self.password_hash and self.password_file:
            raise ValueError("set password_hash or password_file, not both")
        if not (self.password_hash or self.password_file or self.networks):
            raise ValueError("an account needs password_hash, password_file or networks")
        return self


class PoolConfig(_Model):
    """Dedicated sending addresses: an account's mail leaves from these, round-robin.

    Every address must be configured on a local interface (the bind fails otherwise and delivery defers).
    The EHLO name is ``helos[address]``, else ``helo``, else ``[delivery] helo`` / the server's hostname;
    each address's PTR record should name the host it says it is (forward-confirmed reverse DNS).
    """

    addresses: list[str] = Field(min_length=1)
    helo: str | None = None
    helos: dict[str, str] = {}

    @field_validator("addresses")
    @classmethod
    def _ips(cls, v: list[str]) -> list[str]:
        out = [ip_text(a) for a in v]
        for ip in out:
            if out.count(ip) > 1:
                raise ValueError(f"address {ip} is listed twice")
        return out

    @model_validator(mode="after")
    def _helos_known(self) -> PoolConfig:
        for ip in self.helos:
            if ip not in self.addresses:
                raise ValueError(f"helos: {ip} is not one of this pool's addresses")
        return self

    def sources(self) -> list[tuple[str, str | None]]:
        """(address, EHLO name, or None for the delivery default) in file order."""
        return [(ip, self.helos.get(ip, self.helo)) for ip in self.addresses]


class ShapingConfig(_Model):
    """Limits for one destination (a mailbox provider), after KumoMTA's shaping.toml.

    A destination is recognised by recipient domain (``domains``, exact) or by the name of any of its MX
    hosts (``mx``, globs: all ``*.google.com`` MXs are one destination, whatever the recipient domain). The
    entry named ``default`` applies to every other destination (each next hop on its own) and to keys an
    entry leaves out. ``connections`` and ``rate`` count per source address, as providers do.
    """

    mx: list[str] = []
    domains: list[str] = []
    connections: int | None = Field(default=None, ge=1)
    messages_per_connection: int | None = Field(default=None, ge=1)
    rate: RateLimit | None = None
    # how long a source address rests for this destination after a block reply (5.7.x "blocked", "listed")
    suspend: Duration | None = None

    @field_validator("mx", "domains")
    @classmethod
    def _lower(cls, v: list[str]) -> list[str]:
        return [d.strip().lower().rstrip(".") for d in v if d.strip()]


_SHAPING_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _check_shaping(v: dict[str, ShapingConfig]) -> dict[str, ShapingConfig]:
    for name, entry in v.items():
        if not _SHAPING_NAME.match(name):
            raise ValueError(f"shaping entry name {name!r}: use letters, digits, '.', '_' and '-' only")
        if name == "default" and (entry.mx or entry.domains):
            raise ValueError("shaping.default applies to every other destination: no mx or domains here")
    return v


class ShapingFile(_Model):
    """A shaping file (``[delivery] shaping_file``): the same ``[shaping.NAME]`` sections as relayd.toml."""

    shaping: dict[str, ShapingConfig] = {}

    @field_validator("shaping")
    @classmethod
    def _entries(cls, v: dict[str, ShapingConfig]) -> dict[str, ShapingConfig]:
        return _check_shaping(v)


class Config(_Model):
    server: ServerConfig = ServerConfig()
    submission: SubmissionConfig = SubmissionConfig()
    inbound: InboundConfig = InboundConfig()
    http: HttpConfig = HttpConfig()
    store: StoreConfig = StoreConfig()
    queue: QueueConfig = QueueConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    policy: PolicyConfig = PolicyConfig()
    dkim: list[DkimConfig] = []
    accounts: dict[str, AccountConfig] = {}
    pools: dict[str, PoolConfig] = {}
    shaping: dict[str, ShapingConfig] = {}
    #: TLS level per recipient domain, keyed like [delivery] routes ("example.com", ".example.com", "*")
    tls_policy: dict[str, TlsLevelName] = {}

    source: Path | None = Field(default=None, exclude=True)

    @field_validator("accounts")
    @classmethod
    def _names(cls, v: dict[str, AccountConfig]) -> dict[str, AccountConfig]:
        # names travel in Feedback-ID (colon-separated) and tokens: keep them to a safe alphabet
        for name, acct in v.items():
            if not _NAME.match(name):
                raise ValueError(f"account name {name!r}: use letters, digits, '_' and '-' only")
            for lname in acct.lists:
                if not _NAME.match(lname):
                    raise ValueError(
                        f"accounts.{name}.lists: list name {lname!r}: use letters, digits, '_', '-'"
                    )
        return v

    @field_validator("shaping")
    @classmethod
    def _shaping_entries(cls, v: dict[str, ShapingConfig]) -> dict[str, ShapingConfig]:
        return _check_shaping(v)

    @model_validator(mode="after")
    def _pools_exist(self) -> Config:
        for name, acct in self.accounts.items():
            if acct.pool and acct.pool not in self.pools:
                raise ValueError(f"accounts.{name}.pool: no [pools.{acct.pool}] section")
        return self

    def account_for_network(self, ip: str) -> str | None:
        """The account whose ``networks`` contain ``ip`` (first in file order), if any."""
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return None
        for name, acct in self.accounts.items():
            if any(addr in net for net in acct.networks):
                return name
        return None
