"""DANE for SMTP (RFC 7672): TLSA records of an MX host say which certificate it must present.

Only DNSSEC-validated data counts: relayd does not validate signatures itself, it asks the resolvers of
``[delivery] nameservers`` (which must validate) and takes an answer only when it carries the AD bit
(RFC 6840 §5.7; the queries set AD to ask for it). Without configured nameservers DANE is off: the system
resolver is no validating resolver relayd can vouch for. The MX RRset must be validated too (§2.2.1), or
the TLSA records of its hosts are not looked up; an attacker who can forge the MX can point it anywhere.
So must the host's address records (§2.2.1, relayd.queue.routing): TLSA records of a host whose A/AAAA
answer was not validated are not looked up either (Postfix does the same), as the connection could go to
an address an attacker chose.

Usable records (§3.1): DANE-EE(3) matches the server's own certificate or public key, with no name check
and no expiry check (§3.1.1); DANE-TA(2) matches a CA certificate or key that the server sends in its
chain, and the leaf must then chain up to it and name the MX host (§3.1.2, §3.2.2). PKIX-TA(0) and
PKIX-EE(1) are not for SMTP (§3.1.3) and are ignored. Selectors: full certificate (0) or
SubjectPublicKeyInfo (1); matching: exact (0), SHA-256 (1), SHA-512 (2).

A validated TLSA RRset for an MX host makes TLS mandatory for it: no STARTTLS, a failed handshake or no
matching record defers the delivery with 4.7.5 (relayd.queue.transport.tlspolicy). A validated RRset with no
usable
record still makes TLS mandatory, unauthenticated (§2.2: level ``encrypt`` for that host, as Postfix
does); only the absence of a validated RRset leaves the configured level (:class:`TlsaStatus`). A TLSA
lookup that fails (not a validated "no such record") defers too: an attacker who can make it fail must
not get plaintext (§2.2).
DANE wins over MTA-STS (RFC 8461 §2): a domain with a DANE-protected MX host is not given an MTA-STS plan.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.resolver
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification

from relayd.core.errors import TemporaryFailure
from relayd.queue.transport.tlspolicy import TLS_CODE, TLS_STATUS, TlsLevel

log = logging.getLogger(__name__)

DANE_TA = 2
DANE_EE = 3


@dataclass(frozen=True, slots=True)
class Tlsa:
    usage: int
    selector: int
    mtype: int
    data: bytes


def usable(records: Sequence[Tlsa]) -> tuple[Tlsa, ...]:
    """The records SMTP may use (§3.1): DANE-TA or DANE-EE, known selector and matching type."""
    return tuple(
        r for r in records if r.usage in (DANE_TA, DANE_EE) and r.selector in (0, 1) and r.mtype in (0, 1, 2)
    )


def _selected(cert: x509.Certificate, der: bytes, selector: int) -> bytes:
    if selector == 0:
        return der
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _digest(data: bytes, mtype: int) -> bytes:
    if mtype == 1:
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    return data


def _matches(record: Tlsa, cert: x509.Certificate, der: bytes) -> bool:
    return _digest(_selected(cert, der, record.selector), record.mtype) == record.data


def check(records: Sequence[Tlsa], chain: Sequence[bytes], name: str) -> str | None:
    """Whether the presented ``chain`` (DER, leaf first) satisfies ``records`` for MX host ``name``:
    None if so, else why not."""
    if not chain:
        return "no certificate presented"
    try:
        certs = [x509.load_der_x509_certificate(der) for der in chain]
    except ValueError as exc:
        return f"unreadable certificate: {exc}"
    leaf = certs[0]
    if any(r.usage == DANE_EE and _matches(r, leaf, chain[0]) for r in records):
        return None
    for ta_cert, der in zip(certs[1:], chain[1:], strict=True):
        if not any(r.usage == DANE_TA and _matches(r, ta_cert, der) for r in records):
            continue
        try:
            # the chain and the name are checked, not the Web PKI's profile of the server certificate: a
            # DANE-TA is often a private CA, and RFC 7672 asks for no more than a chain to the TA that
            # names the MX host
            verifier = (
                verification.PolicyBuilder()
                .store(verification.Store([ta_cert]))
                .time(dt.datetime.now(dt.UTC))
                .extension_policies(
                    ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(),
                    ee_policy=verification.ExtensionPolicy.permit_all().require_present(
                        x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None
                    ),
                )
                .build_server_verifier(x509.DNSName(name))
            )
            verifier.verify(leaf, certs[1:])
        except (verification.VerificationError, ValueError) as exc:
            return f"DANE-TA matched but the chain does not verify for {name}: {exc}"
        return None
    return "no TLSA record matches the certificate chain"


def peer_chain(ssl_object: ssl.SSLObject) -> list[bytes]:
    """The certificates the server sent, DER, leaf first. Python 3.13 has ``get_unverified_chain``; on
    3.11 and 3.12 the same method exists on the private ``_sslobj`` (it returns Certificate objects)."""
    public = getattr(ssl_object, "get_unverified_chain", None)
    if public is not None:
        return [bytes(c) for c in public()]
    raw = ssl_object._sslobj.get_unverified_chain()  # type: ignore[attr-defined]
    return [c.public_bytes(2) for c in (raw or [])]  # 2: _ssl.ENCODING_DER


class TlsaStatus(enum.Enum):
    """What the TLSA lookup of one MX host says about TLS to it (RFC 7672 §2.2)."""

    #: no validated TLSA RRset (none published, or not DNSSEC-signed): DANE does not apply
    INSECURE = "insecure"
    #: a validated RRset whose records are all unusable for SMTP (PKIX-TA/PKIX-EE, unknown selector or
    #: matching type): TLS is still mandatory, but nothing can be authenticated (§2.2, as Postfix's
    #: "encrypt" fallback of its dane level)
    UNUSABLE = "unusable"
    #: a validated RRset with usable records: the certificate chain must match one of them
    USABLE = "usable"


@dataclass(frozen=True, slots=True)
class TlsaAnswer:
    """The outcome of :meth:`Dane.tlsa`: ``records`` holds the usable records (``USABLE`` only)."""

    status: TlsaStatus
    records: tuple[Tlsa, ...] = ()
    #: every validated record, usable or not: what a TLS report quotes as the policy (RFC 8460 §4.4)
    published: tuple[Tlsa, ...] = ()

    def level(self, configured: TlsLevel) -> TlsLevel:
        """The level a delivery to this host gets, given the ``configured`` one: DANE with usable
        records; with only unusable ones at least ``encrypt`` (a configured ``verify`` is kept: it is
        stronger, and the operator asked for it); without a validated RRset, ``configured``."""
        if self.status is TlsaStatus.USABLE:
            return TlsLevel.DANE
        if self.status is TlsaStatus.UNUSABLE and not configured.required:
            return TlsLevel.ENCRYPT
        return configured


INSECURE = TlsaAnswer(TlsaStatus.INSECURE)


class Dane:
    """TLSA lookups through the validating resolver of ``[delivery] nameservers``."""

    def __init__(self, resolver: dns.asyncresolver.Resolver) -> None:
        self._resolver = resolver

    async def tlsa(self, mx_name: str) -> TlsaAnswer:
        """The validated TLSA RRset of ``mx_name`` port 25, as a :class:`TlsaAnswer`: ``INSECURE`` when
        there is none or it is not validated (no AD bit), ``UNUSABLE`` when it is validated but holds no
        record SMTP can use, ``USABLE`` with the usable records. Raises TemporaryFailure (4.7.5) when the
        lookup fails: a secure MX host whose TLSA records can't be read is not sent to in plaintext."""
        qname = f"_25._tcp.{mx_name}"
        try:
            answer = await self._resolver.resolve(qname, "TLSA")
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            return INSECURE
        except dns.exception.DNSException as exc:
            raise TemporaryFailure(
                f"DANE: TLSA lookup of {qname}: {TLS_CODE} {TLS_STATUS} lookup failed: {exc}",
                TLS_CODE,
                TLS_STATUS,
            ) from exc
        if not answer.response.flags & dns.flags.AD:
            log.debug("DANE: TLSA of %s not validated (no AD bit): ignored", qname)
            return INSECURE
        found = [Tlsa(r.usage, r.selector, r.mtype, bytes(r.cert)) for r in answer]
        records = usable(found)
        if not records:
            log.info("DANE: %s has TLSA records but none usable for SMTP: TLS required, not verified", qname)
            return TlsaAnswer(TlsaStatus.UNUSABLE, (), tuple(found))
        return TlsaAnswer(TlsaStatus.USABLE, records, tuple(found))
