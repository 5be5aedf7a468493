"""Generate the factory corpus: real DSNs from real MTAs, labelled by construction.

Run as root on a Debian machine with Postfix installed (see README.md)::

    python tests/corpus_factory/generate.py [--families postfix,exim,sendmail,opensmtpd]

The script re-executes itself inside a new mount and network namespace (``unshare``):
there it brings up its own loopback, mounts private copies of /etc/resolv.conf,
/etc/hosts, /etc/passwd and /etc/group (the unpacked MTAs want their system users) and a
private /var/spool, starts a resolver on 127.0.0.1:53, the scripted next hops and the
capturing MX, then each MTA in turn. Each message it submits names its failure in the
generator's own tables only (recipient names are neutral), and each DSN that comes back
to the capturing MX is matched to its message by Message-ID and written to
``corpus/dsn/<family>-<nn>.eml`` with its labels in ``corpus/labels.jsonl``.
"""

from __future__ import annotations

import argparse
import asyncio
import email.message
import email.policy
import email.utils
import json
import os
import re
import shutil
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import mtas  # noqa: E402
import peers  # noqa: E402
from scenarios import SCENARIOS, Scenario  # noqa: E402

CORPUS = HERE / "corpus"
CAPTURE_IP = "127.0.0.2"
SCRIPTED_IP = "127.0.0.3"
MAILREJECT_IP = "127.0.0.4"
TLSONLY_IP = "127.0.0.5"
GREETING_IP = "127.0.0.6"
REFUSED_IP = "127.0.0.7"
NAMES = (
    "anna.berg",
    "bruno",
    "carla.m",
    "dieter",
    "emma_l",
    "farid",
    "greta",
    "hugo.p",
    "ines",
    "jonas",
    "kim.o",
    "lena",
    "marek",
    "nora.s",
    "oskar",
    "paula",
    "quentin",
    "rosa",
    "sven",
    "tara",
)


@dataclass
class Case:
    """One submitted message and what its DSN must say."""

    family: str
    scenario: Scenario
    message_id: str
    recipients: list[str]
    sender: str
    wording: str | None
    dsns: list[bytes] = field(default_factory=list)


def zones() -> dict[str, tuple[str, str | None]]:
    table: dict[str, tuple[str, str | None]] = {mtas.SENDER_DOMAIN: ("mx.sender.example.com", CAPTURE_IP)}
    for scenario in SCENARIOS:
        domain = scenario.domain
        if scenario.name == "notaccept":
            table[domain] = (".", None)
        elif scenario.phase in ("rcpt", "data"):
            table[domain] = (f"mx.{domain}", SCRIPTED_IP)
        elif scenario.phase == "mail" and scenario.name == "rejected":
            table[domain] = (f"mx.{domain}", MAILREJECT_IP)
        elif scenario.phase == "mail":
            table[domain] = (f"mx.{domain}", TLSONLY_IP)
        elif scenario.phase == "greeting":
            table[domain] = (f"mx.{domain}", GREETING_IP)
        elif scenario.name == "refused":
            table[domain] = (f"mx.{domain}", REFUSED_IP)
    return table


class Peers:
    """The resolver, scripted hosts and capturing MX, on an event loop in a thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.scripted = peers.Script()
        self.captured: list[bytes] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def sink(self, body: bytes, sender: str, rcpts: list[str]) -> None:
        if sender == "":
            with self.lock:
                self.captured.append(body)

    def start(self) -> None:
        self.thread.start()
        rejected = next(s for s in SCENARIOS if s.name == "rejected")
        tls = next(s for s in SCENARIOS if s.name == "securityerror")
        greeting = next(s for s in SCENARIOS if s.name == "greeting-block")

        async def up() -> None:
            await peers.serve_dns(zones())
            await peers.serve_smtp(CAPTURE_IP, "mx.sender.example.com", None, self.sink)
            await peers.serve_smtp(SCRIPTED_IP, "mx.users.example.net", self.scripted)
            await peers.serve_smtp(
                MAILREJECT_IP, "mx.strict.example.net", peers.Script(mail=rejected.replies)
            )
            await peers.serve_smtp(TLSONLY_IP, "mx.tlsonly.example.net", peers.Script(mail=tls.replies))
            await peers.serve_smtp(
                GREETING_IP, "mx.greet.example.org", peers.Script(greeting=greeting.replies)
            )

        asyncio.run_coroutine_threadsafe(up(), self.loop).result(10)

    def take(self) -> list[bytes]:
        with self.lock:
            taken, self.captured = self.captured, []
        return taken


def enter_namespace(work: Path) -> None:
    """Re-run this script in a private mount + network namespace (then never return)."""
    if os.environ.get("FACTORY_INSIDE") == "1":
        return
    env = dict(os.environ, FACTORY_INSIDE="1", FACTORY_WORK=str(work))
    # --pid: when this script (PID 1 in there) ends, the kernel ends every daemon it started.
    # --uts: a host name of our own, so that no message names the build machine.
    argv = [
        "unshare",
        "--mount",
        "--net",
        "--pid",
        "--uts",
        "--mount-proc",
        "--fork",
        sys.executable,
        *sys.argv,
    ]
    code = subprocess.call(argv, env=env)
    if "--keep" not in sys.argv:
        shutil.rmtree(work, ignore_errors=True)
    raise SystemExit(code)


def private_system(work: Path) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["hostname", "mta.example.test"], check=True)
    # Postfix (and Exim) want their listening address configured on an interface.
    for last in [*range(2, 8), *range(101, 101 + len(FAMILIES) + 1)]:
        subprocess.run(["ip", "addr", "add", f"127.0.0.{last}/32", "dev", "lo"], check=True)
    etc = work / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions attempts:1 timeout:1\n")
    hosts = "127.0.0.1 localhost\n" + "".join(
        f"127.0.0.{100 + i} relay-{family}.example.test\n" for i, family in enumerate(FAMILIES, 1)
    )
    (etc / "hosts").write_text(hosts)
    passwd = Path("/etc/passwd").read_text()
    group = Path("/etc/group").read_text()
    passwd += "Debian-exim:x:1901:1901::/nonexistent:/usr/sbin/nologin\n"
    passwd += "opensmtpd:x:1902:1902::/nonexistent:/usr/sbin/nologin\n"
    passwd += "opensmtpq:x:1903:1903::/nonexistent:/usr/sbin/nologin\n"
    passwd += "smmta:x:1904:1904::/nonexistent:/usr/sbin/nologin\n"
    passwd += "smmsp:x:1905:1905::/nonexistent:/usr/sbin/nologin\n"
    group += "Debian-exim:x:1901:\nopensmtpd:x:1902:\nopensmtpq:x:1903:\nsmmta:x:1904:\nsmmsp:x:1905:\n"
    (etc / "passwd").write_text(passwd)
    (etc / "group").write_text(group)
    for name in ("resolv.conf", "hosts", "passwd", "group"):
        subprocess.run(["mount", "--bind", str(etc / name), f"/etc/{name}"], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/var/spool"], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run"], check=True)


FAMILIES = ("postfix", "exim", "sendmail", "opensmtpd")


#: Failures that stay temporary for a while: the "delayed" phase sends only these.
DELAYED_SCENARIOS = frozenset({"mailboxfull-temp", "refused"})


def make_cases(family: str, peers_: Peers, start: int, delays: bool = False) -> list[Case]:
    cases: list[Case] = []
    serial = start
    for scenario in SCENARIOS:
        if delays and scenario.name not in DELAYED_SCENARIOS:
            continue
        wordings: list[str | None] = list(scenario.replies) or [None]
        if scenario.name == "hostunknown":
            wordings = [None, None]
        for index, wording in enumerate(wordings):
            serial += 1
            count = 1 + (serial % 3)
            domain = scenario.domain.format(n=serial)
            rcpts = [f"{NAMES[(serial * 7 + k) % len(NAMES)]}{serial}@{domain}" for k in range(count)]
            for rcpt in rcpts:
                if wording is not None and scenario.phase == "rcpt":
                    peers_.scripted.rcpt[rcpt] = wording
                elif wording is not None and scenario.phase == "data":
                    peers_.scripted.data[rcpt] = wording
            sender = f"news{serial % 5}@{mtas.SENDER_DOMAIN}"
            message_id = f"<f{serial}.{index}.{family}@{mtas.SENDER_DOMAIN}>"
            cases.append(Case(family, scenario, message_id, rcpts, sender, wording))
    return cases


def submit(address: str, case: Case) -> None:
    msg = EmailMessage()
    msg["From"] = f"Newsletter <{case.sender}>"
    msg["To"] = ", ".join(case.recipients)
    msg["Subject"] = "Our December newsletter"
    msg["Date"] = email.utils.formatdate(localtime=False)
    msg["Message-ID"] = case.message_id
    msg["List-Id"] = "<news.sender.example.com>"
    msg.set_content("Hello,\n\nthis month's news from the example shop.\n\n-- \nThe example shop\n")
    with smtplib.SMTP(address, 25, timeout=30) as smtp:
        smtp.sendmail(case.sender, case.recipients, msg.as_bytes(policy=email.policy.SMTP))


_MSGID = re.compile(rb"<f\d+\.\d+\.[a-z]+@sender\.example\.com>")


def collect(peers_: Peers, cases: list[Case], mta: mtas.Mta, wait: float) -> list[bytes]:
    """Wait for the DSNs of ``cases``; returns DSNs that matched no case."""
    by_id = {case.message_id.encode(): case for case in cases}
    strays: list[bytes] = []
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        for dsn in peers_.take():
            found = _MSGID.search(dsn)
            case = by_id.get(found.group(0)) if found else None
            if case is None:
                strays.append(dsn)
            else:
                case.dsns.append(dsn)
        if all(case.dsns for case in cases):
            break
        mta.flush()
        time.sleep(2)
    return strays


def build_mta(family: str, work: Path, index: int, delays: bool = False) -> mtas.Mta:
    """The MTA of ``family``; with ``delays``, the variant that warns instead of bouncing."""
    address = f"127.0.0.{100 + index}"
    hostname = f"relay-{family}.example.test"
    kinds: dict[str, type[mtas.Mta]] = {
        "postfix": mtas.PostfixDelays if delays else mtas.Postfix,
        "exim": mtas.EximDelays if delays else mtas.Exim,
        "sendmail": mtas.SendmailDelays if delays else mtas.Sendmail,
        "opensmtpd": mtas.OpenSmtpdDelays if delays else mtas.OpenSmtpd,
    }
    return kinds[family](family, address, hostname, work / (family + ("-delays" if delays else "")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--wait", type=float, default=90.0)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the MTAs need their own users and port 25 inside the namespace")
    work = Path(os.environ.get("FACTORY_WORK") or tempfile.mkdtemp(prefix="bounce-factory-"))
    work.chmod(0o755)  # the MTAs' own users must reach their spools below it
    families = [f for f in args.families.split(",") if f]
    if os.environ.get("FACTORY_INSIDE") != "1":
        # downloads happen before the namespace cuts the network off
        wanted = [p for f in families for p in mtas.PACKAGES.get(f, [])]
        if wanted:
            mtas.unpack(work / "debs", work / "root", wanted)
    enter_namespace(work)
    private_system(work)
    the_peers = Peers()
    the_peers.start()
    (CORPUS / "dsn").mkdir(parents=True, exist_ok=True)
    labels_path = CORPUS / "labels.jsonl"
    labels = {}
    if labels_path.exists():
        for line in labels_path.read_text().splitlines():
            label = json.loads(line)
            if label["lhost"].lower() not in families:
                labels[label["file"]] = label
    for family in families:
        for old in (CORPUS / "dsn").glob(f"{family}-*.eml"):
            old.unlink()
        cases, strays = [], []
        for delays in (False, True):
            mta = build_mta(family, work, FAMILIES.index(family) + 1, delays)
            mta.start()
            mtas.wait_for_port(mta.address)
            batch = make_cases(family, the_peers, 1000 * (FAMILIES.index(family) + 1) + 500 * delays, delays)
            for case in batch:
                submit(mta.address, case)
            strays += collect(the_peers, batch, mta, args.wait)
            mta.stop()
            if delays:
                # the first warning is the sample; later ones (or a bounce) are not kept
                for case in batch:
                    del case.dsns[1:]
            cases += batch
        written = 0
        for case in cases:
            for dsn in case.dsns:
                written += 1
                name = f"dsn/{family}-{written:03d}.eml"
                (CORPUS / name).write_bytes(dsn.replace(b"\r\n", b"\n"))
                labels[name] = label_for(name, case, dsn)
        missing = [c.scenario.name for c in cases if not c.dsns]
        print(f"{family}: {written} DSNs, {len(strays)} unmatched, no DSN for: {missing}", flush=True)
    labels_path.write_text("".join(json.dumps(labels[k], sort_keys=True) + "\n" for k in sorted(labels)))


def _per_recipient_fields(dsn: bytes) -> dict[str, dict[str, str]]:
    """Action and Status per Final-Recipient, read from the DSN's delivery-status part."""
    parsed = email.message_from_bytes(dsn)
    fields: dict[str, dict[str, str]] = {}
    for part in parsed.walk():
        if part.get_content_type() != "message/delivery-status":
            continue
        payload = part.get_payload()
        blocks = payload if isinstance(payload, list) else []
        for block in blocks:
            if not isinstance(block, email.message.Message):
                continue
            final = str(block.get("Final-Recipient", ""))
            address = final.rpartition(";")[2].strip().strip("<>").lower()
            if address:
                fields[address] = {
                    "action": str(block.get("Action", "")).strip().lower(),
                    "status": str(block.get("Status", "")).strip(),
                }
    return fields


def label_for(name: str, case: Case, dsn: bytes) -> dict[str, object]:
    """The labels of one DSN: the scenario's, adjusted to what the MTA reported doing.

    A report whose Status is x.4.7 says the queue lifetime ran out; without the remote's
    code quoted beside it the cause is the expiry (``expired``); a ``delayed`` report is
    never hard; a delayed report about a refused connection is a ``networkerror`` when
    its status says so (X.4.1, sisimai's reading of such notices).
    """
    scenario = case.scenario
    fields = _per_recipient_fields(dsn)
    text = dsn.lower()
    recipients = []
    for rcpt in case.recipients:
        address = rcpt.lower()
        if address.encode() not in text:
            continue
        got = fields.get(address, {})
        delayed = got.get("action") == "delayed"
        status = got.get("status") or scenario.status
        reason = scenario.reason
        quoted = scenario.status.encode() in text
        if (status.endswith(".4.7") and not quoted) or b"retry time not reached" in text:
            # The MTA says it gave up (or did not try again) for lack of time and does not
            # quote the remote's code: the expiry is all the report tells. When it does quote
            # it, the cause stays the label (sisimai prefers the quoted code to x.4.7).
            reason = "expired"
        elif delayed and scenario.name == "refused":
            # X.4.1/X.4.2 or the text say the connection failed; a warning with a bare
            # 4.0.0 and no reason (Exim) says only that the mail is late
            named = status[1:4] == ".4." or b"network error" in text or b"connection refused" in text
            reason = "networkerror" if named else "expired"
        recipients.append(
            {
                "address": address,
                "status": status,
                "reply_code": (case.wording or "")[:3] or None,
                "reason": reason,
                "hard": scenario.hard and not delayed and not status.startswith("4"),
            }
        )
    return {
        "file": name,
        "kind": "dsn",
        "source": f"tests/corpus_factory: {case.family}, scenario {scenario.name}",
        "recipients": recipients,
        "feedback_type": None,
        "lhost": {"opensmtpd": "OpenSMTPD"}.get(case.family, case.family.capitalize()),
        "family": f"factory-{case.family}",
        "scenario": scenario.name,
        "wording": case.wording,
    }


if __name__ == "__main__":
    main()
