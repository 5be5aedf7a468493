"""Independent DKIM verifiers for the tests: dkimpy, Perl Mail::DKIM and libopendkim.

None of them shares code with :mod:`relayd.mail.dkim`, and none touches the network: the public keys are given
as ``records`` (``"<selector>._domainkey.<domain>"`` -> TXT text, unquoted), e.g. parsed from what
``relayd dkim keygen`` prints with :func:`records_from_zone_lines`.

- dkimpy (Python; also the reference for canonicalization and body hashes);
- Perl Mail::DKIM (Debian libmail-dkim-perl; the installed 1.20230212 has rsa-sha256 only, so callers check
  ed25519 there only when :data:`MAIL_DKIM_ED25519` says the installed version has the algorithm);
- libopendkim (C, Debian libopendkim11), driven through ctypes in a child process with its test-only
  "file" key query method. ``opendkim-testmsg`` cannot be used: it verifies only against live DNS.

Each verifier returns ``{selector: result}`` for the signatures of ``domain``, where the result is
``"pass"`` or a failure description (dkimpy: ``"fail"``; Mail::DKIM: its ``result_detail``; libopendkim:
``"fail: ..."``).
"""

from __future__ import annotations

import ctypes.util
import functools
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import dkim as dkimpy

from tests.mail_dkim import verify_files

Results = dict[str, str]  # selector -> "pass" or a failure description
Records = Mapping[str, str]  # "<selector>._domainkey.<domain>" -> TXT text


def records_from_zone_lines(lines: Iterable[str]) -> dict[str, str]:
    """``sel._domainkey.d. IN TXT "v=DKIM1; ..." "..."`` lines -> ``{"sel._domainkey.d": "v=DKIM1; ..."}``
    (the quoted character-strings joined, RFC 6376 §3.6.2.2)."""
    records: dict[str, str] = {}
    for line in lines:
        m = re.fullmatch(r"(\S+?)\.?\s+IN\s+TXT\s+(.*)", line.strip())
        if m is None:
            continue
        records[m.group(1).lower()] = "".join(re.findall(r'"([^"]*)"', m.group(2)))
    return records


# --- dkimpy ----------------------------------------------------------------------------------------------


def verify_dkimpy(message: bytes, records: Records, domain: str) -> Results:
    import nacl  # noqa: F401  # dkimpy needs PyNaCl for ed25519

    table = {(name + ".").encode(): txt.encode() for name, txt in records.items()}

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return table.get(name)

    results: Results = {}
    d = dkimpy.DKIM(message)
    sigs = [value for name, value in d.headers if name.lower() == b"dkim-signature"]
    for idx, value in enumerate(sigs):
        tags = dkimpy.util.parse_tag_value(value)
        if tags[b"d"] != domain.encode():
            continue
        try:
            ok = d.verify(idx=idx, dnsfunc=dnsfunc)
        except dkimpy.DKIMException:
            ok = False
        results[tags[b"s"].decode()] = "pass" if ok else "fail"
    return results


# --- Perl Mail::DKIM -------------------------------------------------------------------------------------


def _have_perl_mail_dkim() -> bool:
    if shutil.which("perl") is None:
        return False
    return subprocess.run(["perl", "-MMail::DKIM::Verifier", "-e1"], capture_output=True).returncode == 0


def _mail_dkim_has_ed25519() -> bool:
    probe = ["perl", "-MMail::DKIM::Algorithm::ed25519_sha256", "-e1"]
    return subprocess.run(probe, capture_output=True).returncode == 0


HAVE_MAIL_DKIM = _have_perl_mail_dkim()
MAIL_DKIM_ED25519 = HAVE_MAIL_DKIM and _mail_dkim_has_ed25519()


def verify_mail_dkim(message: bytes, records: Records, domain: str, workdir: Path) -> Results:
    path = workdir / "mail-dkim-message.eml"
    path.write_bytes(message)
    results: Results = {}
    for _, sig_domain, selector, detail in verify_files([path], records, workdir):
        if sig_domain == domain:
            results[selector] = detail
    return results


# --- libopendkim -----------------------------------------------------------------------------------------

# libopendkim through ctypes, in a child process so that a crash in C cannot take pytest down. Constants
# from libopendkim/dkim.h (OpenDKIM 2.11).
OPENDKIM_VERIFIER = r"""
import ctypes, json, sys
DKIM_OP_SETOPT, DKIM_OPTS_QUERYMETHOD, DKIM_OPTS_QUERYINFO, DKIM_QUERY_FILE = 1, 6, 7, 1
DKIM_SIGFLAG_PASSED, DKIM_SIGBH_MATCH = 0x04, 0
lib = ctypes.CDLL(sys.argv[1])
P = ctypes.c_void_p
lib.dkim_init.restype = P
lib.dkim_init.argtypes = [P, P]
lib.dkim_options.argtypes = [P, ctypes.c_int, ctypes.c_int, P, ctypes.c_size_t]
lib.dkim_verify.restype = P
lib.dkim_verify.argtypes = [P, ctypes.c_char_p, P, ctypes.POINTER(ctypes.c_int)]
lib.dkim_chunk.argtypes = [P, ctypes.c_char_p, ctypes.c_size_t]
lib.dkim_eom.argtypes = [P, P]
lib.dkim_getsiglist.argtypes = [P, ctypes.POINTER(ctypes.POINTER(P)), ctypes.POINTER(ctypes.c_int)]
lib.dkim_sig_getflags.restype = ctypes.c_uint
lib.dkim_sig_getflags.argtypes = [P]
lib.dkim_sig_getbh.argtypes = [P]
lib.dkim_sig_geterror.argtypes = [P]
lib.dkim_sig_geterrorstr.restype = ctypes.c_char_p
lib.dkim_sig_geterrorstr.argtypes = [ctypes.c_int]
lib.dkim_sig_getdomain.restype = ctypes.c_char_p
lib.dkim_sig_getdomain.argtypes = [P]
lib.dkim_sig_getselector.restype = ctypes.c_char_p
lib.dkim_sig_getselector.argtypes = [P]
lib.dkim_free.argtypes = [P]
lib.dkim_close.argtypes = [P]

handle = lib.dkim_init(None, None)
method = ctypes.c_int(DKIM_QUERY_FILE)
assert lib.dkim_options(handle, DKIM_OP_SETOPT, DKIM_OPTS_QUERYMETHOD, ctypes.byref(method),
                        ctypes.sizeof(method)) == 0
info = ctypes.create_string_buffer(sys.argv[2].encode())
assert lib.dkim_options(handle, DKIM_OP_SETOPT, DKIM_OPTS_QUERYINFO, info, len(info.value)) == 0
message = sys.stdin.buffer.read()
status = ctypes.c_int()
ctx = lib.dkim_verify(handle, b"relayd-test", None, ctypes.byref(status))
assert ctx and status.value == 0, status.value
lib.dkim_chunk(ctx, message, len(message))
lib.dkim_chunk(ctx, None, 0)
eom = lib.dkim_eom(ctx, None)
sigs = ctypes.POINTER(P)()
nsigs = ctypes.c_int()
lib.dkim_getsiglist(ctx, ctypes.byref(sigs), ctypes.byref(nsigs))
out = []
for i in range(nsigs.value):
    sig = sigs[i]
    passed = bool(lib.dkim_sig_getflags(sig) & DKIM_SIGFLAG_PASSED)
    passed = passed and lib.dkim_sig_getbh(sig) == DKIM_SIGBH_MATCH
    error = (lib.dkim_sig_geterrorstr(lib.dkim_sig_geterror(sig)) or b"").decode()
    out.append({"domain": (lib.dkim_sig_getdomain(sig) or b"").decode(),
                "selector": (lib.dkim_sig_getselector(sig) or b"").decode(),
                "result": "pass" if passed else "fail: " + error})
lib.dkim_free(ctx)
lib.dkim_close(handle)
json.dump({"eom": eom, "sigs": out}, sys.stdout)
"""

LIBOPENDKIM = ctypes.util.find_library("opendkim")


def verify_opendkim(message: bytes, records: Records, domain: str, workdir: Path) -> Results:
    assert LIBOPENDKIM is not None, "libopendkim is not installed"
    # dkim_get_key_file(): "<selector>._domainkey.<domain> <key data>" per line; the key data must not
    # contain spaces (the parser splits at the first whitespace run only, but keep it simple).
    key_file = workdir / "opendkim-keys"
    key_file.write_text("".join(f"{name} {txt.replace(' ', '')}\n" for name, txt in records.items()))
    proc = subprocess.run(
        [sys.executable, "-c", OPENDKIM_VERIFIER, LIBOPENDKIM, str(key_file)],
        input=message,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    report = json.loads(proc.stdout)
    return {s["selector"]: s["result"] for s in report["sigs"] if s["domain"] == domain}


# --- required, not optional ------------------------------------------------------------------------------


def required(present: bool, what: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """The independent verifiers are part of the proof, not optional: a missing one fails the test
    (`.ci/run` installs them: Debian libmail-dkim-perl, libopendkim11)."""

    def mark(fn: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(fn)
        def wrapper(*args: object, **kwargs: object) -> None:
            assert present, f"{what} is not installed; run .ci/run or install it"
            fn(*args, **kwargs)

        return wrapper

    return mark


needs_mail_dkim = required(HAVE_MAIL_DKIM, "Perl Mail::DKIM")
needs_opendkim = required(LIBOPENDKIM is not None, "libopendkim")
