"""The TLS a delivery must have: a level per destination, and what happens when it can't be met.

Levels follow Postfix's ``smtp_tls_security_level``:

* ``none``: never STARTTLS.
* ``may``: STARTTLS when offered, nothing verified; a failed handshake falls back to plaintext (the
  transport says for how long). An unencrypted delivery beats a bounce where nobody asked for more.
* ``encrypt``: STARTTLS required, the certificate not verified (protects against passive listeners only).
* ``verify``: STARTTLS required, the chain verified against the system CA store (or ``[delivery]
  tls_ca_file``) and the name checked against the MX host name, or the configured route or smarthost host.

A delivery whose level is not met is deferred with ``4.7.5`` (RFC 3463: cryptographic failure) and
nothing of the transaction is sent: no MAIL FROM before the TLS handshake has succeeded. Deferred, not
bounced, because a missing STARTTLS is as often a stripping middlebox or a certificate renewal gone wrong
as a policy of the receiver, and those heal; the queue's ``max_age`` bounds the wait.

Where the level comes from: ``[tls_policy]`` keyed by recipient domain like ``[delivery] routes`` (exact
domain, then ``.parent`` suffixes, then ``"*"``), else ``[delivery] tls``. That holds for routes and for a
smarthost as well as for MX delivery: in smarthost mode ``[delivery] tls`` is the smarthost's level.
"""

from __future__ import annotations

import enum
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from relayd.core.errors import TemporaryFailure

#: RFC 3463 X.7.5 "Cryptographic failure": what a deferral for an unmet TLS level carries.
TLS_STATUS = "4.7.5"
#: The reply code of such a deferral (Postfix uses 4xx with 4.7.5 for the same case).
TLS_CODE = 451


class TlsLevel(enum.Enum):
    NONE = "none"
    MAY = "may"
    ENCRYPT = "encrypt"
    VERIFY = "verify"
    #: not configurable: what an MX host with validated TLSA records gets (relayd.queue.transport.dane)
    DANE = "dane"

    @property
    def required(self) -> bool:
        """Whether a delivery without TLS is refused (deferred) at this level."""
        return self in (TlsLevel.ENCRYPT, TlsLevel.VERIFY, TlsLevel.DANE)


class TlsUnmet(TemporaryFailure):
    """The destination's TLS level could not be met: deferred, and nothing of the message was sent.

    ``result`` is the RFC 8460 §4.3 result type that TLS reporting counts the failure under."""

    result: str = "validation-failure"


def unmet(level: TlsLevel, host: str, port: int, why: str, result: str = "validation-failure") -> TlsUnmet:
    """The failure for one host; its text carries the 4.7.5 status the queue records as the reply."""
    exc = TlsUnmet(
        f"TLS to {host}:{port}: {TLS_CODE} {TLS_STATUS} TLS level {level.value} not met: {why}",
        TLS_CODE,
        TLS_STATUS,
        text=f"TLS level {level.value} not met: {why}",
    )
    exc.result = result
    return exc


#: OpenSSL verify codes (``X509_V_ERR_*``) -> RFC 8460 §4.3.2.1 result types
_VERIFY_RESULTS = {
    62: "certificate-host-mismatch",  # X509_V_ERR_HOSTNAME_MISMATCH
    64: "certificate-host-mismatch",  # X509_V_ERR_IP_ADDRESS_MISMATCH
    10: "certificate-expired",  # X509_V_ERR_CERT_HAS_EXPIRED
    2: "certificate-not-trusted",  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT
    18: "certificate-not-trusted",  # X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT
    19: "certificate-not-trusted",  # X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN
    20: "certificate-not-trusted",  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: "certificate-not-trusted",  # X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE
}


def handshake_result(exc: BaseException) -> str:
    """The RFC 8460 result type of a failed STARTTLS handshake (the cause chain is searched for the
    certificate error; anything else is a ``validation-failure``)."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            break
        if isinstance(seen, ssl.SSLCertVerificationError):
            return _VERIFY_RESULTS.get(seen.verify_code, "validation-failure")
        seen = seen.__cause__ or seen.__context__
    return "validation-failure"


_V = TypeVar("_V")


def lookup_domain(table: Mapping[str, _V], domain: str) -> _V | None:
    """The entry for ``domain``: the exact name, then parent domains written ``.example.test``, then
    ``*``; the same matching as ``[delivery] routes``. ``table`` keys must be lower case."""
    domain = domain.lower().rstrip(".")
    if domain in table:
        return table[domain]
    labels = domain.split(".")
    for i in range(1, len(labels)):
        hit = table.get("." + ".".join(labels[i:]))
        if hit is not None:
            return hit
    return table.get("*")


@dataclass(frozen=True, slots=True)
class TlsPolicies:
    """The configured level of each destination: ``[tls_policy]`` over ``[delivery] tls``."""

    default: TlsLevel
    table: Mapping[str, TlsLevel]

    @classmethod
    def from_config(cls, default: str, table: Mapping[str, str]) -> TlsPolicies:
        return cls(TlsLevel(default), {k.lower().rstrip("."): TlsLevel(v) for k, v in table.items()})

    def level_for(self, domain: str) -> TlsLevel:
        found = lookup_domain(self.table, domain)
        return self.default if found is None else found
