"""Read a DMARC aggregate report (RFC 7489 §7.2, appendix C) out of a message, refusing what could hurt.

Anyone can mail ``dmarc@<inbound domain>``, so the report is attacker input in three layers, each bounded:

* **the message**: the MIME parts are walked up to :data:`MAX_PARTS`; the first part that is a report
  (``text/xml``/``application/xml``, ``application/gzip``, ``application/zip``, or an
  ``application/octet-stream`` whose name or first bytes say so; else an XML body) is read, nothing else.
  Its decoded size is capped at :data:`MAX_COMPRESSED`.
* **the archive**: gzip is stream-decompressed with ``max_length``, so no more than
  :data:`MAX_XML` + 1 bytes are ever produced whatever the input claims (a "gzip bomb" is refused at the
  cap, having cost the cap). A zip must hold exactly one member, not encrypted, not itself an archive,
  whose declared size (at most :data:`MAX_XML`) and compression ratio (at most :data:`MAX_RATIO`) are
  checked before a byte is inflated; it is then read with the same cap, because the declared sizes are
  the sender's word. What comes out must not be an archive again (no nesting).
* **the XML**: parsed by defusedxml with DTDs forbidden, so entity expansion (billion laughs) and external
  entities (file or network reads) are refused before they happen; at most :data:`MAX_RECORDS` records are
  read, and every string is clipped.

Google sends a zip (``google.com!<domain>!<begin>!<end>.zip``), Microsoft and Yahoo a gzip (``.xml.gz``);
some send the XML itself. Reporters differ in namespaces (the DMARCbis drafts add one) and in optional
fields, so elements are matched by local name and anything unknown is ignored.

:func:`read_mail` is pure and never raises for bad input: it returns a :class:`DmarcReading` whose
``refused`` says why. The inbound listener runs it in a child process with a time limit
(:mod:`relayd.reports.parseworker`), like the bounce and complaint parsers.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import zipfile
import zlib
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32
from xml.etree.ElementTree import Element, ParseError

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

__all__ = [
    "MAX_COMPRESSED",
    "MAX_RATIO",
    "MAX_RECORDS",
    "MAX_XML",
    "DmarcReading",
    "DmarcRecord",
    "DmarcReport",
    "Refused",
    "decompress_gzip",
    "parse_xml",
    "read_mail",
    "unzip_one",
]

#: Largest report attachment, decoded from base64 but still compressed.
MAX_COMPRESSED = 5 * 1024 * 1024
#: Largest XML, once decompressed: a reporter with a few thousand sources stays well below it.
MAX_XML = 10 * 1024 * 1024
#: Largest compression ratio a zip member may declare: XML reports compress 5-30 times, bombs thousands.
MAX_RATIO = 200
#: Records read from one report; a report with more is refused rather than half read.
MAX_RECORDS = 50_000
#: MIME parts looked at.
MAX_PARTS = 50
_MAX_TEXT = 255
_MAX_COUNT = 10**9
_CHUNK = 64 * 1024

_GZIP_MAGIC = b"\x1f\x8b"
_ZIP_MAGIC = b"PK\x03\x04"
_GZIP_TYPES = frozenset({"application/gzip", "application/x-gzip", "application/x-gunzip"})
_ZIP_TYPES = frozenset({"application/zip", "application/x-zip", "application/x-zip-compressed"})
_XML_TYPES = frozenset({"text/xml", "application/xml"})
_ARCHIVE_NAMES = (".zip", ".gz", ".tgz", ".tar", ".bz2", ".xz", ".7z", ".rar")


class Refused(Exception):
    """The message holds no report we will read; the text says why (for the operator, never a reply)."""


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    """One ``record`` of a report: ``count`` messages from ``source_ip``. ``spf_aligned``/``dkim_aligned``
    are the policy evaluation's results (DMARC passes on either); ``spf_pass``/``dkim_pass`` whether any
    SPF or DKIM check in ``auth_results`` passed, aligned or not."""

    source_ip: str
    count: int
    disposition: str
    spf_aligned: bool
    dkim_aligned: bool
    spf_pass: bool
    dkim_pass: bool


@dataclass(frozen=True, slots=True)
class DmarcReport:
    """A report's metadata (who, which id, which domain, which time range) and its records."""

    org: str
    report_id: str
    domain: str
    begin: int
    end: int
    policy: str
    records: tuple[DmarcRecord, ...]


@dataclass(frozen=True, slots=True)
class DmarcReading:
    """What :func:`read_mail` made of a message: a report, or why none was read."""

    report: DmarcReport | None
    refused: str | None = None


def read_mail(raw: bytes) -> DmarcReading:
    """The DMARC aggregate report in ``raw``, or why it was refused. Never raises for bad input."""
    try:
        return DmarcReading(parse_xml(_report_xml(raw)))
    except Refused as exc:
        return DmarcReading(None, str(exc)[:_MAX_TEXT])


# -- the message ---------------------------------------------------------------------------------------------


def _report_xml(raw: bytes) -> bytes:
    try:
        msg = BytesParser(policy=compat32).parsebytes(raw)
    except Exception as exc:  # the stdlib parser is lenient; this is belt and braces
        raise Refused(f"unreadable message: {type(exc).__name__}") from None
    for n, part in enumerate(msg.walk()):
        if n >= MAX_PARTS:
            break
        if part.is_multipart():
            continue
        kind = _kind(part)
        if kind is None:
            continue
        data = _payload(part)
        if len(data) > MAX_COMPRESSED:
            raise Refused(f"report attachment of {len(data)} bytes is over {MAX_COMPRESSED}")
        if kind == "xml" and data.startswith((_GZIP_MAGIC, _ZIP_MAGIC)):
            kind = "gzip" if data.startswith(_GZIP_MAGIC) else "zip"  # mislabelled: read what it is
        if kind == "gzip":
            xml = decompress_gzip(data)
        elif kind == "zip":
            xml = unzip_one(data)
        else:
            xml = data
        if xml.startswith((_GZIP_MAGIC, _ZIP_MAGIC)):
            raise Refused("nested archive")
        return xml
    raise Refused("no report attachment (xml, gzip or zip)")


def _kind(part: Message) -> str | None:
    ctype = part.get_content_type().lower()
    name = (part.get_filename() or "").lower()
    if ctype in _ZIP_TYPES or name.endswith(".zip"):
        return "zip"
    if ctype in _GZIP_TYPES or name.endswith(".gz"):
        return "gzip"
    if ctype in _XML_TYPES or name.endswith(".xml"):
        return "xml"
    if ctype == "application/octet-stream":
        head = _payload(part)[:4]
        if head.startswith(_GZIP_MAGIC):
            return "gzip"
        if head.startswith(_ZIP_MAGIC):
            return "zip"
    if ctype == "text/plain" and not name:
        body = _payload(part)[:512].lstrip()
        if body.startswith((b"<?xml", b"<feedback")):
            return "xml"
    return None


def _payload(part: Message) -> bytes:
    try:
        data = part.get_payload(decode=True)
    except Exception:
        return b""
    return data if isinstance(data, bytes) else b""


# -- the archive ---------------------------------------------------------------------------------------------


def decompress_gzip(data: bytes, limit: int = MAX_XML) -> bytes:
    """Inflate a gzip stream, producing at most ``limit`` + 1 bytes whatever it holds; raises Refused when
    it holds more than ``limit`` or is corrupt. Trailing members or junk are ignored (one report)."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    out = bytearray()
    pending = data
    try:
        while pending and not inflater.eof:
            out += inflater.decompress(pending, limit + 1 - len(out))
            if len(out) > limit:
                raise Refused(f"decompressed size over {limit} bytes (gzip)")
            pending = inflater.unconsumed_tail
        if not inflater.eof:
            out += inflater.flush(limit + 1 - len(out)) if len(out) <= limit else b""
    except zlib.error as exc:
        raise Refused(f"corrupt gzip: {exc}") from None
    if len(out) > limit:
        raise Refused(f"decompressed size over {limit} bytes (gzip)")
    return bytes(out)


def unzip_one(data: bytes, limit: int = MAX_XML) -> bytes:
    """The one member of a zip archive, inflated to at most ``limit`` bytes; raises Refused for more than
    one member, an encrypted or nested one, a declared size or ratio over the limits (checked before
    inflating), or more bytes than declared (read with the cap)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
            if len(members) != 1:
                raise Refused(f"zip with {len(members)} members (one report expected)")
            info = members[0]
            if info.flag_bits & 0x1:
                raise Refused("encrypted zip member")
            if info.filename.lower().endswith(_ARCHIVE_NAMES):
                raise Refused("nested archive")
            if info.file_size > limit:
                raise Refused(f"zip member declares {info.file_size} bytes, over {limit}")
            if info.file_size > MAX_RATIO * max(info.compress_size, 1):
                raise Refused(f"zip member compression ratio over {MAX_RATIO}")
            with archive.open(info) as member:
                out = bytearray()
                while len(out) <= limit:
                    chunk = member.read(min(_CHUNK, limit + 1 - len(out)))
                    if not chunk:
                        break
                    out += chunk
    except Refused:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, zlib.error) as exc:
        raise Refused(f"corrupt zip: {exc}") from None
    except (OSError, ValueError, RuntimeError) as exc:
        raise Refused(f"unreadable zip: {exc}") from None
    if len(out) > limit:
        raise Refused(f"decompressed size over {limit} bytes (zip)")
    return bytes(out)


# -- the XML -------------------------------------------------------------------------------------------------


def parse_xml(xml: bytes) -> DmarcReport:
    """An aggregate report from its XML; raises Refused for a DTD or entity (never expanded), XML that
    does not parse, or a document that is no aggregate report."""
    if len(xml) > MAX_XML:
        raise Refused(f"XML of {len(xml)} bytes is over {MAX_XML}")
    try:
        root = SafeET.fromstring(xml, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as exc:
        raise Refused(f"XML refused: {type(exc).__name__}") from None
    except (ParseError, ValueError) as exc:
        raise Refused(f"XML does not parse: {exc}") from None
    if _local(root.tag) != "feedback":
        raise Refused(f"root element is {_local(root.tag)[:40]!r}, not 'feedback'")
    meta = _child(root, "report_metadata")
    published = _child(root, "policy_published")
    org = _text(meta, "org_name")
    report_id = _text(meta, "report_id")
    domain = _text(published, "domain").lower().rstrip(".")
    if not (org and report_id and domain):
        raise Refused("not an aggregate report: org_name, report_id or policy_published/domain missing")
    dates = _child(meta, "date_range")
    begin, end = _int(_text(dates, "begin")), _int(_text(dates, "end"))
    records: list[DmarcRecord] = []
    for element in root:
        if _local(element.tag) != "record":
            continue
        if len(records) >= MAX_RECORDS:
            raise Refused(f"more than {MAX_RECORDS} records")
        record = _record(element)
        if record is not None:
            records.append(record)
    return DmarcReport(org, report_id, domain, begin, end, _text(published, "p").lower(), tuple(records))


def _record(element: Element) -> DmarcRecord | None:
    row = _child(element, "row")
    try:
        source_ip = str(ipaddress.ip_address(_text(row, "source_ip")))
    except ValueError:
        return None
    count = min(_int(_text(row, "count")), _MAX_COUNT)
    evaluated = _child(row, "policy_evaluated")
    auth = _child(element, "auth_results")
    passed = {"spf": False, "dkim": False}
    if auth is not None:
        for result in auth:
            method = _local(result.tag)
            if method in passed and _text(result, "result").lower() == "pass":
                passed[method] = True
    return DmarcRecord(
        source_ip=source_ip,
        count=count,
        disposition=_text(evaluated, "disposition").lower() or "none",
        spf_aligned=_text(evaluated, "spf").lower() == "pass",
        dkim_aligned=_text(evaluated, "dkim").lower() == "pass",
        spf_pass=passed["spf"],
        dkim_pass=passed["dkim"],
    )


def _local(tag: object) -> str:
    """An element's name without its namespace (``{urn:...}record`` -> ``record``)."""
    return str(tag).rpartition("}")[2]


def _child(parent: Element | None, name: str) -> Element | None:
    if parent is None:
        return None
    for element in parent:
        if _local(element.tag) == name:
            return element
    return None


def _text(parent: Element | None, name: str) -> str:
    element = _child(parent, name)
    if element is None or element.text is None:
        return ""
    return " ".join(element.text[: _MAX_TEXT * 4].split())[:_MAX_TEXT]


def _int(text: str) -> int:
    with contextlib.suppress(ValueError):
        return max(0, int(text))
    return 0
