"""DKIM signing: rsa-sha256 (RFC 6376) and ed25519-sha256 (RFC 8463), relaxed/relaxed.

Signing is the last step of the policy pipeline (DESIGN.md, Flow 4): the caller hands over the exact CRLF
bytes that will be delivered and prepends what :meth:`Signer.sign` returns. A domain with several keys
configured (typically one rsa and one ed25519, RFC 8463 §1 / RFC 6376 §4.2) gets one signature per key.

Why not dkimpy: dkimpy does the RSA private-key operation in pure Python, about 20 times slower than
OpenSSL through ``cryptography``. Here canonicalization (RFC 6376 §3.4.2, §3.4.4), the hashes (§3.7) and the
header field (§3.5) are built locally and only the signature primitive comes from ``cryptography``.
dkimpy, Perl Mail::DKIM and libopendkim check the result in the tests.

Errors: :class:`DkimKeyError` (a :class:`ValueError`) for any key that cannot be used, raised when the key is
loaded or generated, never while signing; a key file that group or others may read is refused with
:class:`UnsafeKeyFile`, which is also a :class:`~relayd.core.errors.ConfigError` so that ``relayd serve``
exits
2 naming the file (as for ``[server] secret_file``). ``Signer.sign`` itself does not fail on odd input: it
signs what it is given.

Header sections are byte strings of header fields, each ending in CRLF, without the empty line that ends the
header section; :func:`split_message` cuts a message that way.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import logging
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from relayd.core.errors import ConfigError
from relayd.core.secret import exposed

__all__ = [
    "ALGORITHMS",
    "SIGNED_HEADERS",
    "BodyHash",
    "DkimKey",
    "DkimKeyError",
    "Signer",
    "UnsafeKeyFile",
    "body_hash",
    "canonicalize_body",
    "canonicalize_header",
    "keygen",
    "load_key",
    "split_message",
]

log = logging.getLogger(__name__)

#: Key types accepted in ``[[dkim]] algorithm`` and their ``a=`` tag value (RFC 6376 §3.3, RFC 8463 §3).
ALGORITHMS: dict[str, bytes] = {"rsa": b"rsa-sha256", "ed25519": b"ed25519-sha256"}

#: Header fields signed when present, in this order (RFC 6376 §5.4 leaves the choice to the signer). Every
#: instance is signed, and the name is listed once more than it occurs ("oversigning", RFC 6376 §5.4.2 and
#: §8.15) so that a later hop cannot add an instance (a second From:, a replacement List-Unsubscribe:) without
#: breaking the signature. DKIM-Signature itself is never listed: signatures the application added stay
#: untouched below ours.
SIGNED_HEADERS: tuple[bytes, ...] = (
    b"from",
    b"to",
    b"subject",
    b"date",
    b"message-id",
    b"list-unsubscribe",
    b"list-unsubscribe-post",
    b"feedback-id",
    b"x-relayd-id",
    b"mime-version",
    b"content-type",
    b"content-transfer-encoding",
    b"reply-to",
    b"cc",
    b"list-id",
)
_SIGNED = frozenset(SIGNED_HEADERS)

# RFC 8301 §3.2: signers MUST use at least 1024 bits and SHOULD use 2048. We require 2048: 1024-bit RSA is
# within reach of a well-funded attacker, and a factored key signs as the domain until it is replaced.
_RSA_MIN_BITS = 2048
_RSA_DEFAULT_BITS = 2048
_FOLD_WIDTH = 76  # keep signature lines under the RFC 5322 §2.1.1 recommendation of 78
_B64_CHUNK = 72

# RFC 6376 §3.1: a selector is a sub-domain; d= is a domain name (§3.5), A-labels here.
_LABEL = rb"[a-z0-9](?:[a-z0-9_-]{0,61}[a-z0-9])?"
_NAME_RE = re.compile(rb"(?:" + _LABEL + rb"\.)*" + _LABEL, re.IGNORECASE)

_FIELD_SPLIT = re.compile(rb"\r\n(?![ \t])")
_LINE_ENDING = re.compile(rb"\r\n|\r|\n")


class DkimKeyError(ValueError):
    """A DKIM key that cannot be used: unreadable file, not a private key, wrong type, bad name.

    The message names the key file (or the domain/selector) and the problem, fit for
    ``FILE: key.path: problem`` config errors and for the CLI.
    """


class UnsafeKeyFile(DkimKeyError, ConfigError):
    """A DKIM key file that group or others may read: whoever can read it can sign mail as the domain.

    Both a :class:`DkimKeyError` (callers that handle bad keys handle this one) and a
    :class:`~relayd.core.errors.ConfigError` (the daemon refuses to start, exit 2, naming the file)."""

    def __init__(self, message: str) -> None:
        ConfigError.__init__(self, [message])


class WeakKey(DkimKeyError, ConfigError):
    """An rsa key shorter than relayd accepts: the daemon refuses to start (exit 2), naming the file."""

    def __init__(self, message: str) -> None:
        ConfigError.__init__(self, [message])


PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True, slots=True)
class DkimKey:
    """One ``[[dkim]]`` config entry with its private key loaded.

    ``domain`` is lower-case A-labels without a trailing dot; ``algorithm`` is ``"rsa"`` or ``"ed25519"``.
    """

    domain: str
    selector: str
    algorithm: str
    private_key: PrivateKey = field(repr=False, compare=False)

    @property
    def dns_name(self) -> str:
        """The owner name of the key record: ``<selector>._domainkey.<domain>`` (RFC 6376 §3.6.2.1)."""
        return f"{self.selector}._domainkey.{self.domain}"

    def public_key_b64(self) -> str:
        """The ``p=`` value: base64 DER SubjectPublicKeyInfo for rsa (RFC 6376 §3.6.1), the raw 32-byte key
        for ed25519 (RFC 8463 §4.2)."""
        public = self.private_key.public_key()
        if isinstance(public, ed25519.Ed25519PublicKey):
            raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        else:
            raw = public.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        return base64.b64encode(raw).decode("ascii")

    def dns_txt(self) -> str:
        """The key record's text, unquoted: ``v=DKIM1; k=rsa; p=...`` (RFC 6376 §3.6.1)."""
        return f"v=DKIM1; k={self.algorithm}; p={self.public_key_b64()}"

    def zone_line(self) -> str:
        """The key record as a zone-file line.

        A DNS character-string holds at most 255 octets (RFC 1035 §3.3.14) and a 2048-bit rsa ``p=`` is
        longer, so the text is split into several quoted strings, which verifiers concatenate
        (RFC 6376 §3.6.2.2).
        """
        text = self.dns_txt()
        strings = " ".join(f'"{text[i : i + 250]}"' for i in range(0, len(text), 250))
        return f"{self.dns_name}. IN TXT {strings}"


def _normalize_domain(domain: str) -> str:
    """Lower-case, drop a trailing dot, and turn U-labels into A-labels (RFC 6376 §3.5 ``d=``)."""
    name = domain.strip().rstrip(".").lower()
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise DkimKeyError(f"domain {domain!r}: not a valid domain name ({exc})") from exc
    return name


def _check_names(domain: str, selector: str) -> None:
    if not _NAME_RE.fullmatch(domain.encode("ascii")):
        raise DkimKeyError(f"domain {domain!r}: not a valid domain name")
    if not selector.isascii() or not _NAME_RE.fullmatch(selector.encode("ascii")):
        raise DkimKeyError(f"selector {selector!r}: not a valid selector (RFC 6376 §3.1)")


def _check_algorithm(algorithm: str) -> None:
    if algorithm not in ALGORITHMS:
        raise DkimKeyError(f"algorithm {algorithm!r}: expected one of {', '.join(ALGORITHMS)}")


def load_key(domain: str, selector: str, key_file: Path, algorithm: str) -> DkimKey:
    """Read a PEM private key (PKCS#8, or PKCS#1 for rsa) for ``domain``/``selector``.

    Raises :class:`DkimKeyError` when the file cannot be read, holds no unencrypted private key or holds a
    key of the other algorithm; :class:`WeakKey` for an rsa key shorter than 2048 bits. Raises
    :class:`UnsafeKeyFile` for a usable key in a file with any group or other permission bits (checked after
    the content, so a broken file is reported as broken first).
    """
    _check_algorithm(algorithm)
    name = _normalize_domain(domain)
    _check_names(name, selector)
    try:
        data = key_file.read_bytes()
        mode = key_file.stat().st_mode
    except OSError as exc:
        raise DkimKeyError(f"{key_file}: cannot read DKIM key: {exc.strerror or exc}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:  # encrypted PEM and no password
        raise DkimKeyError(f"{key_file}: DKIM key is encrypted; relayd needs an unencrypted key") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise DkimKeyError(f"{key_file}: not a PEM private key ({exc})") from exc
    if algorithm == "rsa":
        if not isinstance(key, rsa.RSAPrivateKey):
            raise DkimKeyError(f"{key_file}: algorithm is rsa but the file holds {_describe(key)}")
        if key.key_size < _RSA_MIN_BITS:
            raise WeakKey(
                f"{key_file}: dkim.key_file: rsa key has {key.key_size} bits, relayd needs at least"
                f" {_RSA_MIN_BITS} (RFC 8301 §3.2); make a new one with relayd dkim keygen"
            )
    elif not isinstance(key, ed25519.Ed25519PrivateKey):
        raise DkimKeyError(f"{key_file}: algorithm is ed25519 but the file holds {_describe(key)}")
    if (bits := exposed(mode)) is not None:
        raise UnsafeKeyFile(
            f"{key_file}: dkim.key_file: readable by group or others (mode {bits:04o}); chmod 600 it"
        )
    return DkimKey(name, selector, algorithm, key)


def _describe(key: object) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "an rsa key"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "an ed25519 key"
    return f"a {type(key).__name__.removeprefix('_')}"


def keygen(
    domain: str, selector: str, algorithm: str, out_dir: Path, *, bits: int = _RSA_DEFAULT_BITS
) -> tuple[Path, str]:
    """Generate a key, write it as PEM PKCS#8 with mode 0600, return ``(path, zone line)``.

    The file is ``out_dir/<domain>.<selector>.<algorithm>.pem``. An existing file is never overwritten (that
    would silently orphan the published DNS record): :class:`DkimKeyError` instead. The zone line is
    :meth:`DkimKey.zone_line`, e.g. ``sel._domainkey.example.test. IN TXT "v=DKIM1; k=ed25519; p=..."``.
    """
    _check_algorithm(algorithm)
    name = _normalize_domain(domain)
    _check_names(name, selector)
    key: PrivateKey
    if algorithm == "rsa":
        if bits < _RSA_MIN_BITS:
            raise DkimKeyError(f"rsa keys need at least {_RSA_MIN_BITS} bits (RFC 8301 §3.2), not {bits}")
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    else:
        key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path = out_dir / f"{name}.{selector}.{algorithm}.pem"
    try:
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise DkimKeyError(f"{path}: already exists; refusing to overwrite a DKIM key") from exc
    except OSError as exc:
        raise DkimKeyError(f"{path}: cannot write DKIM key: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "wb") as out:
        os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask
        out.write(pem)
        out.flush()
        os.fsync(fd)
    return path, DkimKey(name, selector, algorithm, key).zone_line()


# --- canonicalization (RFC 6376 §3.4) ------------------------------------------------------------------


def _to_crlf(data: bytes) -> bytes:
    """Make every line end CRLF, the form the message has on the wire (RFC 5321 §2.3.8).

    The input should already be CRLF; bare CR or LF are turned into CRLF as an SMTP client would, so that
    the signature matches what arrives. The check is three C-level counts; the rewrite only happens
    for odd input.
    """
    lf = data.count(b"\n")
    if lf == data.count(b"\r") == data.count(b"\r\n"):
        return data
    return _LINE_ENDING.sub(b"\r\n", data)


def split_message(message: bytes) -> tuple[bytes, bytes]:
    """Split a CRLF message into ``(header section, body)`` at the first empty line (RFC 5322 §2.1).

    The header section keeps the CRLF of its last field; the empty line belongs to neither part. A message
    without an empty line is all header section with an empty body.
    """
    if message.startswith(b"\r\n"):
        return b"", message[2:]
    end = message.find(b"\r\n\r\n")
    if end < 0:
        if message and not message.endswith(b"\r\n"):
            message += b"\r\n"
        return message, b""
    return message[: end + 2], message[end + 4 :]


def _collapse_wsp(data: bytes) -> bytes:
    """Turn every run of SP and HTAB into one SP.

    Done with ``bytes.replace`` rather than a regex: each pass halves the longest run, so ordinary text
    takes one or two C-speed passes (several times faster than ``re.sub`` on a body with many spaces).
    """
    data = data.replace(b"\t", b" ")
    while b"  " in data:
        data = data.replace(b"  ", b" ")
    return data


def canonicalize_body(body: bytes) -> bytes:
    """The "relaxed" body canonicalization of RFC 6376 §3.4.4 (CRLF input).

    WSP at line ends is dropped, other WSP runs become one SP, empty lines at the end are dropped, and a
    non-empty body gets a final CRLF. An empty body stays empty (RFC 6376 erratum 3006 / §3.4.4 text).

    A last line without CRLF is treated as the CRLF-ended line SMTP delivers (RFC 5321 §4.1.1.4), so WSP
    at its end is dropped as well: the hash matches what the receiver canonicalizes. (dkimpy, handed the
    unterminated bytes, keeps that WSP; on the delivered bytes it agrees.)
    """
    if not body:
        return b""
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    body = _collapse_wsp(body).replace(b" \r\n", b"\r\n").rstrip(b"\r\n")
    return body + b"\r\n" if body else b""


def canonicalize_header(field_: bytes) -> bytes:
    """The "relaxed" header canonicalization of RFC 6376 §3.4.2, for one field without its final CRLF.

    Lower-case the name, unfold, turn WSP runs into one SP, drop WSP at the end of the value and around the
    colon. Returns the field with a CRLF (callers drop it where §3.7 says so).
    """
    name, _, value = field_.partition(b":")
    value = _collapse_wsp(value.replace(b"\r\n", b"")).strip(b" ")
    return name.rstrip(b" \t").lower() + b":" + value + b"\r\n"


@functools.lru_cache(maxsize=2048)
def _canonical_field(field_: bytes) -> bytes:
    """:func:`canonicalize_header`, remembered: the copies of one message (one per recipient) share all
    their fields but the per-recipient ones, so each of those is canonicalized once, not once per copy."""
    return canonicalize_header(field_)


@dataclass(frozen=True, slots=True)
class BodyHash:
    """SHA-256 of the relaxed-canonical body (RFC 6376 §3.7 step 1), the ``bh=`` tag.

    Both rsa-sha256 and ed25519-sha256 hash the body with SHA-256 (RFC 8463 §3), so one value serves every
    key: compute it once per body, sign each recipient's header section with it.
    """

    digest: bytes

    @property
    def b64(self) -> bytes:
        return base64.b64encode(self.digest)


def body_hash(body: bytes) -> BodyHash:
    """Hash a message body (the bytes after the empty line that ends the header section)."""
    return BodyHash(hashlib.sha256(canonicalize_body(_to_crlf(body))).digest())


# --- signing (RFC 6376 §3.5, §3.7, §5; RFC 8463 §3) ----------------------------------------------------


def _select_headers(header_section: bytes) -> tuple[list[bytes], bytes]:
    """Pick the fields to sign; return the ``h=`` names and their canonical bytes in ``h=`` order.

    RFC 6376 §5.4.2: instances of a repeated name are signed from the bottom up; the extra name added for
    oversigning matches no instance and so contributes nothing to the hash.
    """
    found: dict[bytes, list[bytes]] = {}
    for raw in _FIELD_SPLIT.split(header_section):
        colon = raw.find(b":")
        if colon <= 0:
            continue  # the empty piece after the last CRLF, or a malformed line: not ours to sign
        name = raw[:colon].rstrip(b" \t").lower()
        if name in _SIGNED:
            found.setdefault(name, []).append(raw)
    names: list[bytes] = []
    canonical: list[bytes] = []
    for name in SIGNED_HEADERS:
        instances = found.get(name)
        if not instances:
            continue
        for raw in reversed(instances):
            canonical.append(_canonical_field(raw))
        names.extend([name] * (len(instances) + 1))
    return names, b"".join(canonical)


def _fold(tokens: Iterable[tuple[bytes, bytes]], used: int) -> bytes:
    """Join ``(separator, token)`` pairs, starting a new line (CRLF TAB) where a line would get too wide.

    Only places where the DKIM-Signature grammar allows FWS are offered as tokens (RFC 6376 §3.2 tag-list,
    §3.5 ``h=`` around colons and base64 values).
    """
    out: list[bytes] = []
    width = used
    for sep, token in tokens:
        if out and width + len(sep) + len(token) > _FOLD_WIDTH:
            out.append(b"\r\n\t")
            width = 1
        elif out:
            out.append(sep)
            width += len(sep)
        out.append(token)
        width += len(token)
    return b"".join(out)


#: Stand-ins for the two values of a signature header that change between copies, of the exact length of the
#: real ones: ``t=`` (ten digits until the year 2286) and ``bh=`` (SHA-256 in base64, 44 characters). Folding
#: only looks at lengths and relaxed canonicalization leaves these bytes alone, so a header folded and
#: canonicalized once with them becomes any copy's header by two ``bytes.replace``.
_T_MARK = b"\x00" * 10
_BH_MARK = b"\x01" * 44
_LAYOUTS = 256  # header-name lists remembered per key; messages of one sender share a handful


@dataclass(frozen=True, slots=True)
class _Layout:
    """The folded signature header of one key and ``h=`` list, with :data:`_T_MARK` and :data:`_BH_MARK`
    where ``t=`` and ``bh=`` go: as sent (``head``) and relaxed-canonical without its CRLF (``canonical``);
    ``room`` is what is left of the last line for the start of ``b=``."""

    head: bytes
    canonical: bytes
    room: int


@dataclass(frozen=True, slots=True)
class _PreparedKey:
    """A key with the constant part of its signature header ready. Why the layouts: every copy of a
    message (one per recipient) signs the same header names with the same key, so folding the tag list and
    canonicalizing the new header (most of a signature's Python work) is done once per name list."""

    key: DkimKey
    fixed_tags: tuple[tuple[bytes, bytes], ...]
    layouts: dict[tuple[bytes, ...], _Layout] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, key: DkimKey) -> _PreparedKey:
        tags = (
            b"v=1;",
            b"a=" + ALGORITHMS[key.algorithm] + b";",
            b"c=relaxed/relaxed;",
            b"d=" + key.domain.encode("ascii") + b";",
            b"s=" + key.selector.encode("ascii") + b";",
        )
        return cls(key, tuple((b" ", tag) for tag in tags))

    def _header(self, names: Sequence[bytes], t: bytes, bh: bytes) -> bytes:
        """The DKIM-Signature field up to and including ``b=`` (RFC 6376 §3.5), folded."""
        tokens = [*self.fixed_tags, (b" ", b"t=" + t + b";")]
        if names:
            pieces = [name + b":" for name in names]
            pieces[0] = b"h=" + pieces[0]
            pieces[-1] = pieces[-1][:-1] + b";"
            tokens.append((b" ", pieces[0]))
            tokens.extend((b"", piece) for piece in pieces[1:])
        tokens.append((b" ", b"bh=" + bh + b";"))
        tokens.append((b" ", b"b="))
        return b"DKIM-Signature: " + _fold(tokens, len(b"DKIM-Signature: "))

    def _layout(self, names: tuple[bytes, ...]) -> _Layout:
        layout = self.layouts.get(names)
        if layout is None:
            head = self._header(names, _T_MARK, _BH_MARK)
            room = max(_FOLD_WIDTH - (len(head) - head.rfind(b"\n") - 1), 0)
            layout = _Layout(head, canonicalize_header(head)[:-2], room)
            if len(self.layouts) >= _LAYOUTS:
                self.layouts.clear()
            self.layouts[names] = layout
        return layout

    def signature_field(self, names: list[bytes], canonical_headers: bytes, bh: BodyHash, now: int) -> bytes:
        """Build and sign one DKIM-Signature field (RFC 6376 §3.5, §3.7 steps 2-3); CRLF-terminated."""
        t, bh64 = b"%d" % now, bh.b64
        if len(t) == len(_T_MARK):
            layout = self._layout(tuple(names))
            head = layout.head.replace(_T_MARK, t).replace(_BH_MARK, bh64)
            canonical, room = layout.canonical.replace(_T_MARK, t).replace(_BH_MARK, bh64), layout.room
        else:  # a test's timestamp of another width: fold this one on its own
            head = self._header(names, t, bh64)
            canonical = canonicalize_header(head)[:-2]
            room = max(_FOLD_WIDTH - (len(head) - head.rfind(b"\n") - 1), 0)
        # §3.7: the field itself is hashed last, canonicalized, with an empty b= and no final CRLF.
        signed = canonical_headers + canonical
        private = self.key.private_key
        if isinstance(private, ed25519.Ed25519PrivateKey):
            # RFC 8463 §3: PureEdDSA Ed25519 over the SHA-256 hash of the data, not over the data itself.
            signature = private.sign(hashlib.sha256(signed).digest())
        else:
            signature = private.sign(signed, _PKCS1, _SHA256)
        b = base64.b64encode(signature)
        # The b= value may hold FWS (RFC 6376 §3.5); verifiers drop it with the value before hashing.
        chunks = [b[:room], *(b[i : i + _B64_CHUNK] for i in range(room, len(b), _B64_CHUNK))]
        return head + b"\r\n\t".join(chunks) + b"\r\n"


_PKCS1 = padding.PKCS1v15()
_SHA256 = hashes.SHA256()


class Signer:
    """Signs messages with every key configured for the signing domain.

    Built once from the loaded ``[[dkim]]`` keys and shared: it holds no per-message state, so concurrent
    use from tasks or threads is safe.
    """

    __slots__ = ("_by_domain",)

    def __init__(self, keys: Sequence[DkimKey]) -> None:
        """Raises :class:`DkimKeyError` if two keys share a domain and selector (one DNS name can publish
        only one key, RFC 6376 §3.6.2.2)."""
        by_domain: dict[str, list[_PreparedKey]] = {}
        seen: set[tuple[str, str]] = set()
        for key in keys:
            if (key.domain, key.selector) in seen:
                raise DkimKeyError(f"{key.dns_name}: two keys configured for the same selector")
            seen.add((key.domain, key.selector))
            by_domain.setdefault(key.domain, []).append(_PreparedKey.of(key))
        self._by_domain: dict[str, tuple[_PreparedKey, ...]] = {d: tuple(ks) for d, ks in by_domain.items()}

    def domains(self) -> frozenset[str]:
        """The domains that have at least one key."""
        return frozenset(self._by_domain)

    def _keys_for(self, domain: str) -> tuple[_PreparedKey, ...]:
        keys = self._by_domain.get(domain)
        if keys is None:
            try:
                keys = self._by_domain.get(_normalize_domain(domain), ())
            except DkimKeyError:
                keys = ()
        return keys

    def sign(self, message: bytes, domain: str, *, timestamp: int | None = None) -> bytes:
        """Return the DKIM-Signature field(s) to prepend to ``message``, or ``b""`` if ``domain`` has no key.

        ``message`` is the exact CRLF message that will be delivered (a bare LF or CR is signed as the CRLF
        an SMTP client turns it into). One field per key of ``domain``, in config order, each CRLF-ended and
        folded. ``timestamp`` sets ``t=`` (default: now).
        """
        keys = self._keys_for(domain)
        if not keys:
            return b""
        header_section, body = split_message(_to_crlf(message))
        return self._sign(  # the body is CRLF already: no second look at its line ends
            keys, header_section, BodyHash(hashlib.sha256(canonicalize_body(body)).digest()), timestamp
        )

    @staticmethod
    def body_hash(body: bytes) -> BodyHash:
        """Hash ``body`` once for :meth:`sign_with_body_hash`; same as module-level :func:`body_hash`."""
        return body_hash(body)

    def sign_with_body_hash(
        self, header_section: bytes, bh: BodyHash, domain: str, *, timestamp: int | None = None
    ) -> bytes:
        """Like :meth:`sign` for a message made of ``header_section``, an empty line and the body ``bh``
        was computed from; use it to sign one body under many per-recipient header sections."""
        keys = self._keys_for(domain)
        if not keys:
            return b""
        header_section = _to_crlf(header_section)
        if header_section and not header_section.endswith(b"\r\n"):
            header_section += b"\r\n"
        return self._sign(keys, header_section, bh, timestamp)

    @staticmethod
    def _sign(
        keys: tuple[_PreparedKey, ...], header_section: bytes, bh: BodyHash, timestamp: int | None
    ) -> bytes:
        now = int(time.time()) if timestamp is None else timestamp
        names, canonical = _select_headers(header_section)
        return b"".join(key.signature_field(names, canonical, bh, now) for key in keys)
