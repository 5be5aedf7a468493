"""A private Postfix + OpenDKIM pair under a temp dir, for benchmarking relayd against the reference MTA.

Nothing of the system mail setup is touched: only the installed binaries and the read-only
``/etc/postfix/postfix-files`` (``meta_directory``) are used. ``main.cf`` and ``master.cf`` are written to
``<dir>/etc``, the queue is ``<dir>/spool``, ``data_directory`` is ``<dir>/data``, the log goes to
``<dir>/postfix.log`` (``maillog_file`` and the ``postlog`` service, no syslog), and OpenDKIM runs in the
foreground from its own config file with a key generated at run time by ``opendkim-genkey``. Postfix
listens on 127.0.0.1:<port> only, relays everything to ``[127.0.0.1]:<sink port>``, has no local delivery
and does no DNS. Needs root (Postfix's master runs as root and drops to the ``postfix`` user).

    pf = PostfixInstance(Path(tmp), listen_port, sink_port, domain="acme.example.test", selector="pfx")
    pf.start()           # opendkim first, then `postfix -c <dir>/etc start`
    ...                  # pf.pids() = master and OpenDKIM, for CPU/RSS accounting over their trees
    pf.stop()            # `postfix -c <dir>/etc stop`, then OpenDKIM
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

# One smtpd on the bench port, the internal services Postfix needs to queue and relay, nothing else. No
# chroot (Debian's master.cf chroots most services into the queue directory, which would need copies of
# /etc files in there). "-" limits mean default_process_limit (100).
MASTER_CF = """\
{port}    inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

MAIN_CF = """\
compatibility_level = 3.6
config_directory = {etc}
queue_directory = {spool}
data_directory = {data}
meta_directory = /etc/postfix
maillog_file = {log}
maillog_file_prefixes = {base}
myhostname = postfix.bench
mydomain = bench
myorigin = $myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
local_recipient_maps =
local_transport = error:local delivery disabled
alias_maps =
alias_database =
relay_domains =
mynetworks = 127.0.0.0/8
mynetworks_style = host
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions = permit_mynetworks, reject
relayhost = [127.0.0.1]:{sink_port}
smtp_dns_support_level = disabled
disable_dns_lookups = yes
smtp_host_lookup = native
lmtp_host_lookup = native
smtpd_peername_lookup = no
smtpd_banner = $myhostname ESMTP
smtpd_tls_security_level = none
smtp_tls_security_level = none
smtputf8_enable = no
biff = no
append_dot_mydomain = no
# Mail from the bench must not wait in the incoming/deferred queues for a retry timer.
queue_run_delay = 10s
minimal_backoff_time = 10s
"""

MILTER_CF = """\
smtpd_milters = inet:127.0.0.1:{milter_port}
non_smtpd_milters =
milter_default_action = tempfail
milter_protocol = 6
"""

OPENDKIM_CONF = """\
Mode                    s
Domain                  {domain}
Selector                {selector}
KeyFile                 {key}
Socket                  inet:{port}@127.0.0.1
Background              no
Syslog                  no
PidFile                 {dir}/opendkim.pid
SignatureAlgorithm      rsa-sha256
Canonicalization        relaxed/relaxed
InternalHosts           127.0.0.0/8
UMask                   007
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def _safe_dir(d: Path) -> bool:
    try:
        st = d.stat()
    except OSError:
        return False
    return st.st_uid == 0 and not st.st_mode & 0o022 and os.access(d, os.W_OK)


def available() -> str | None:
    """None when Postfix and OpenDKIM can run here, else why not."""
    if os.geteuid() != 0:
        return "needs root (Postfix's master starts as root)"
    for tool in ("postfix", "opendkim", "opendkim-genkey", "smtp-source"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian packages postfix, opendkim, opendkim-tools)"
    return None


class PostfixInstance:
    def __init__(
        self,
        port: int,
        sink_port: int,
        *,
        domain: str,
        selector: str,
        bits: int = 2048,
        keep: bool = False,
        milter: bool = True,
        main_cf: str = "",
    ) -> None:
        """``milter=False``: Postfix alone, as a receiving MTA for tests (no OpenDKIM needed);
        ``main_cf``: lines appended to main.cf."""
        # Not under /tmp: OpenDKIM refuses a config file (and key) with a world-writable directory on its
        # path, sticky bit or not. /run is root's, mode 0755, and on this machine the same disk as /tmp.
        parent = Path("/run") if _safe_dir(Path("/run")) else None
        base = Path(tempfile.mkdtemp(prefix="relayd-e2e-postfix-", dir=parent))
        base.chmod(0o755)  # Postfix's unprivileged processes (user postfix) must reach the queue
        self.base = base
        self.keep = keep
        self.port = port
        self.sink_port = sink_port
        self.domain = domain
        self.selector = selector
        self.bits = bits
        self.etc = base / "etc"
        self.spool = base / "spool"
        self.data = base / "data"
        self.log = base / "postfix.log"
        self.dkim_dir = base / "opendkim"
        self.milter_port = _free_port()
        self.opendkim: subprocess.Popen[bytes] | None = None
        self.key_file = self.dkim_dir / f"{selector}.private"
        self.milter = milter
        self.main_cf = main_cf
        self.started = False

    # --- setup -----------------------------------------------------------------------------------------

    def _run(self, *cmd: str) -> str:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout + proc.stderr

    def setup(self) -> None:
        # The queue's subdirectories and data/ are left to `postfix check` below, which creates them owned as
        # Postfix wants; the queue directory itself is root's.
        self.etc.mkdir(mode=0o755)
        self.spool.mkdir(mode=0o755)
        self.dkim_dir.mkdir(mode=0o700)
        (self.etc / "master.cf").write_text(MASTER_CF.format(port=f"127.0.0.1:{self.port}"))
        (self.etc / "main.cf").write_text(
            MAIN_CF.format(
                base=self.base,
                etc=self.etc,
                spool=self.spool,
                data=self.data,
                log=self.log,
                sink_port=self.sink_port,
            )
            + (MILTER_CF.format(milter_port=self.milter_port) if self.milter else "")
            + self.main_cf
        )
        # `postfix check` creates the missing queue and data directories of THIS instance with the owners
        # Postfix wants (post-install create-missing). Not `set-permissions`: that would also re-chown and
        # re-chmod the system's Postfix binaries and man pages listed in /etc/postfix/postfix-files.
        self._run("postfix", "-c", str(self.etc), "check")
        if not self.milter:
            return

        genkey = ["opendkim-genkey", "-b", str(self.bits), "-d", self.domain, "-s", self.selector]
        self._run(*genkey, "-D", str(self.dkim_dir))
        self.key_file.chmod(0o600)
        (self.dkim_dir / "opendkim.conf").write_text(
            OPENDKIM_CONF.format(
                domain=self.domain,
                selector=self.selector,
                key=self.key_file,
                port=self.milter_port,
                dir=self.dkim_dir,
            )
        )

    # --- run -------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.setup()
        if self.milter:
            log = (self.dkim_dir / "opendkim.log").open("wb")
            # a session of its own, as a daemon of its own (Postfix's master makes one too: bench/e2e.py)
            self.opendkim = subprocess.Popen(
                ["opendkim", "-f", "-x", str(self.dkim_dir / "opendkim.conf")],
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
            if not _wait_port(self.milter_port, 15):
                self.stop()
                raise RuntimeError(f"opendkim did not listen: {(self.dkim_dir / 'opendkim.log').read_text()}")
        self._run("postfix", "-c", str(self.etc), "start")
        self.started = True
        if not _wait_port(self.port, 20):
            self.stop()
            raise RuntimeError(f"postfix smtpd did not listen on {self.port}; log:\n{self.log_tail()}")

    def version(self) -> str:
        return self._run("postconf", "-c", str(self.etc), "-h", "mail_version").strip()

    def master_pid(self) -> int | None:
        try:
            return int((self.spool / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def pids(self) -> list[int]:
        """Roots of the process trees to account: Postfix's master (all services are its children) and
        OpenDKIM."""
        out = []
        m = self.master_pid()
        if m is not None:
            out.append(m)
        if self.opendkim is not None and self.opendkim.poll() is None:
            out.append(self.opendkim.pid)
        return out

    def queue_empty(self) -> bool:
        for sub in ("incoming", "active", "deferred", "maildrop"):
            d = self.spool / sub
            if d.exists() and any(f for f in d.rglob("*") if f.is_file()):
                return False
        return True

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.started:
            subprocess.run(["postfix", "-c", str(self.etc), "stop"], capture_output=True, timeout=60)
            # `postfix stop` returns once master was signalled; wait for the master to be gone.
            m = self.master_pid()
            deadline = time.monotonic() + 15
            while m is not None and time.monotonic() < deadline and Path(f"/proc/{m}").exists():
                time.sleep(0.1)
            self.started = False
        if self.opendkim is not None:
            self.opendkim.terminate()
            try:
                self.opendkim.wait(10)
            except subprocess.TimeoutExpired:
                self.opendkim.kill()
                self.opendkim.wait(5)
            self.opendkim = None
        if not self.keep:
            shutil.rmtree(self.base, ignore_errors=True)
