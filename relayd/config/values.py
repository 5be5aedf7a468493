"""The value types of the config file: durations, sizes, rates, ``host:port``, networks, domains.

Why a module of their own: every section of the schema uses them, and the CLI and the listeners parse the
same notations (a ``host:port`` from the command line, a loopback check) without the schema.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, NamedTuple

from pydantic import BeforeValidator

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def parse_duration(value: object) -> float:
    """``"30s"``, ``"15m"``, ``"5d"`` -> seconds. A bare number is seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like '30s', '15m' or '5d'")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("duration must not be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError(f"expected a duration like '30s', '15m' or '5d', got {value!r}")


def parse_size(value: object) -> int:
    """``"25MB"`` -> bytes. A bare integer is bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size like '25MB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("size must not be negative")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()]
    raise ValueError(f"expected a size like '25MB' or '512KB', got {value!r}")


class Rate(NamedTuple):
    """``events`` per ``per`` seconds; ``events == 0`` is no limit at all."""

    events: int
    per: float


_RATE = re.compile(r"^\s*(\d+)\s*/\s*(s|m|h|d)\s*$")
_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_rate(value: object) -> Rate:
    """``"60/m"``, ``"600/h"`` -> :class:`Rate`; ``"unlimited"`` switches the limit off."""
    if isinstance(value, Rate):
        return value
    if isinstance(value, str):
        if value.strip().lower() == "unlimited":
            return Rate(0, 60.0)
        m = _RATE.match(value)
        if m:
            return Rate(int(m.group(1)), _RATE_UNITS[m.group(2)])
    raise ValueError(f"expected a rate like '60/m' or '600/h', or 'unlimited', got {value!r}")


def parse_hostport(value: str, default_port: int | None = None) -> tuple[str, int]:
    """``"127.0.0.1:2525"``, ``"[::1]:2525"``, ``"mx.example.test"`` -> (host, port)."""
    value = value.strip()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep:
            raise ValueError(f"unclosed '[' in {value!r}")
        port_s = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, port_s = value.split(":")
    elif value.count(":") > 1:
        raise ValueError(f"IPv6 addresses need brackets: '[{value}]:port'")
    else:
        host, port_s = value, ""
    if not host:
        raise ValueError(f"no host in {value!r}")
    if not port_s:
        if default_port is None:
            raise ValueError(f"expected host:port, got {value!r}")
        return host, default_port
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"bad port in {value!r}")
    return host, int(port_s)


def _check_hostport(value: str) -> str:
    parse_hostport(value)
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
RateLimit = Annotated[Rate, BeforeValidator(parse_rate)]
HostPort = Annotated[str, BeforeValidator(_check_hostport)]


def _network(value: object) -> object:
    if isinstance(value, str):
        try:
            return ipaddress.ip_network(value, strict=False)
        except ValueError as exc:
            raise ValueError(f"not an IP network: {value!r}") from exc
    return value


Network = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, BeforeValidator(_network)]


def domain_key(domain: str) -> str:
    """``domain`` as sending domains are compared: lower case, no trailing dot, A-labels (an IDN written
    in Unicode in one place and as ``xn--`` in another is the same domain, RFC 5890). A name the IDNA codec
    refuses stays as it is, lower-cased: it then matches nothing but itself."""
    key = domain.strip().lower().rstrip(".")
    if key.isascii():
        return key
    try:
        return key.encode("idna").decode("ascii")
    except UnicodeError:
        return key


def ip_text(value: str) -> str:
    """An IP address in its one text form (``2001:db8::1``, whatever zeros the file wrote), so that the
    same address written two ways is one address; ValueError for anything else."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError as exc:
        raise ValueError(f"not an IP address: {value!r}") from exc


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (an address or a name from the config) is this machine only: 127.0.0.0/8, ::1 or
    ``localhost``. A wildcard such as 0.0.0.0 is not: it listens on every interface."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
