"""Private instances of real MTAs, one per family, each with its own config and spool.

Every instance listens on its own loopback address inside the factory's network namespace,
relays for 127.0.0.0/8, routes by MX through the factory's resolver and is told to give up
on temporary failures at once (or after a second), so that a greylisting next hop turns
into an expiry bounce within the run. Nothing here reads or writes the system's mail
setup: config, spool and logs live under the factory's work directory, and the binaries
of the MTAs that Debian will not co-install with Postfix are unpacked from their .deb
files (``apt-get download`` + ``dpkg-deb -x``) into that directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SENDER_DOMAIN = "sender.example.com"


@dataclass
class Mta:
    family: str
    address: str
    hostname: str
    work: Path

    def start(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def flush(self) -> None:
        """Run the queue once more (expiry of temporarily failed mail)."""

    def stop(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


def _run(
    *argv: str, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, check=False, capture_output=True, text=True, env=env, timeout=120)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return proc


class Postfix(Mta):
    """The Debian ``postfix`` package, run with a private config directory mounted over /etc/postfix."""

    def start(self) -> None:
        etc = self.work / "etc"
        spool = self.work / "spool"
        data = self.work / "data"
        for d in (etc, spool, data):
            d.mkdir(parents=True, exist_ok=True)
        # The package's own files (postfix-files, dynamicmaps.cf) are read, never written:
        # the private copy is mounted over /etc/postfix inside the factory's namespace only.
        for item in Path("/etc/postfix").iterdir():
            if item.is_file() and item.name not in ("main.cf", "master.cf"):
                shutil.copy(item, etc / item.name)
        for sub in ("postfix-files.d", "dynamicmaps.cf.d"):
            if (Path("/etc/postfix") / sub).is_dir():
                shutil.copytree(Path("/etc/postfix") / sub, etc / sub, dirs_exist_ok=True)
        shutil.chown(data, "postfix", "postfix")
        (etc / "main.cf").write_text(
            f"""compatibility_level = 3.6
queue_directory = {spool}
data_directory = {data}
daemon_directory = /usr/lib/postfix/sbin
command_directory = /usr/sbin
shlib_directory = /usr/lib/postfix
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = {self.hostname}
mydomain = example.test
myorigin = $myhostname
mydestination =
inet_interfaces = {self.address}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relay_domains =
alias_maps =
alias_database =
local_recipient_maps =
smtpd_relay_restrictions = permit_mynetworks, reject
smtp_tls_security_level = none
smtpd_tls_security_level = none
maximal_queue_lifetime = {self.lifetime}
bounce_queue_lifetime = 0
delay_warning_time = {self.delay_warning}
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
smtp_connect_timeout = 5s
smtp_bind_address = {self.address}
maillog_file = {self.work}/maillog
maillog_file_prefixes = {self.work}
biff = no
"""
        )
        services = [
            f"{self.address}:smtp inet n - n - - smtpd",
            "pickup unix n - n 60 1 pickup",
            "cleanup unix n - n - 0 cleanup",
            "qmgr unix n - n 300 1 qmgr",
            "rewrite unix - - n - - trivial-rewrite",
            "bounce unix - - n - 0 bounce",
            "defer unix - - n - 0 bounce",
            "trace unix - - n - 0 bounce",
            "verify unix - - n - 1 verify",
            "flush unix n - n 1000? 0 flush",
            "proxymap unix - - n - - proxymap",
            "smtp unix - - n - - smtp",
            "relay unix - - n - - smtp",
            "showq unix n - n - - showq",
            "error unix - - n - - error",
            "retry unix - - n - - error",
            "discard unix - - n - - discard",
            "local unix - n n - - local",
            "anvil unix - - n - 1 anvil",
            "scache unix - - n - 1 scache",
            "postlog unix-dgram n - n - 1 postlogd",
        ]
        (etc / "master.cf").write_text("\n".join(services) + "\n")
        _run("mount", "--bind", str(etc), "/etc/postfix")
        _run("/usr/sbin/postfix", "start")

    lifetime = "0"
    delay_warning = "0h"

    def flush(self) -> None:
        _run("/usr/sbin/postqueue", "-f", check=False)

    def stop(self) -> None:
        _run("/usr/sbin/postfix", "stop", check=False)
        time.sleep(1)
        _run("umount", "/etc/postfix", check=False)


class PostfixDelays(Postfix):
    """Postfix keeping mail for a while and sending "delayed" notices about it."""

    lifetime = "1h"
    delay_warning = "1s"


class Exim(Mta):
    """Debian's exim4-daemon-light, unpacked privately and run with ``-C <private config>``."""

    def start(self) -> None:
        root = self.work.parent / "root"
        # Exim re-executes itself (deliveries, bounce messages) as ``exim_path`` with a
        # cleaned environment: a wrapper puts the unpacked libraries back on the path.
        self.binary = self.work / "exim4"
        self.work.mkdir(parents=True, exist_ok=True)
        libraries = library_env(root)["LD_LIBRARY_PATH"]
        self.binary.write_text(f'#!/bin/sh\nLD_LIBRARY_PATH={libraries} exec {root}/usr/sbin/exim4 "$@"\n')
        self.binary.chmod(0o755)
        # set-uid would make the loader ignore LD_LIBRARY_PATH (secure mode)
        (root / "usr/sbin/exim4").chmod(0o755)
        self.env = library_env(root)
        spool = self.work / "spool"
        (self.work / "log").mkdir(parents=True, exist_ok=True)
        spool.mkdir(parents=True, exist_ok=True)
        for d in (self.work, spool, self.work / "log"):
            shutil.chown(d, "Debian-exim", "Debian-exim")
        self.config = self.work / "exim.conf"
        self.config.write_text(
            f"""primary_hostname = {self.hostname}
exim_path = {self.binary}
exim_user = Debian-exim
exim_group = Debian-exim
keep_environment = LD_LIBRARY_PATH
spool_directory = {spool}
log_file_path = {self.work}/log/%slog
local_interfaces = {self.address}
daemon_smtp_ports = 25
hostlist relay_from_hosts = 127.0.0.0/8
acl_smtp_rcpt = acl_check_rcpt
never_users = root
host_lookup =
rfc1413_hosts =
ignore_bounce_errors_after = 0s
timeout_frozen_after = 1m
delay_warning = {self.delay_warning}
# the default condition spares mail with a List-Id (ours has one)
delay_warning_condition = true
tls_advertise_hosts =

begin acl
acl_check_rcpt:
  accept hosts = +relay_from_hosts
  deny

begin routers
dnslookup:
  driver = dnslookup
  transport = remote_smtp
  no_more

begin transports
remote_smtp:
  driver = smtp
  interface = {self.address}
  hosts_try_chunking =
  hosts_try_prdr =

begin retry
*  *  {self.retry}

begin rewrite
"""
        )
        self.config.chmod(0o644)
        # -bdf: in the factory's PID namespace our parent is PID 1, and Exim would not
        # detach from an "init" anyway; it runs in the foreground as our child.
        self.process = subprocess.Popen(
            [str(self.binary), "-C", str(self.config), "-bdf", "-q2s"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=(self.work / "log" / "stderr").open("w"),
        )

    delay_warning = "0s"
    retry = "F,1s,1s"

    def flush(self) -> None:
        _run(str(self.binary), "-C", str(self.config), "-qff", env=self.env, check=False)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


class Sendmail(Mta):
    """Debian's sendmail-bin, unpacked privately; sendmail.cf built with m4 from sendmail-cf."""

    def start(self) -> None:
        root = self.work.parent / "root"
        queue = self.work / "queue"
        queue.mkdir(parents=True, exist_ok=True)
        queue.chmod(0o700)
        # a copy without the set-gid bit, so that the loader honours LD_LIBRARY_PATH
        self.binary = self.work / "sendmail"
        shutil.copy(root / "usr/libexec/sendmail/sendmail", self.binary)
        self.binary.chmod(0o755)
        self.env = library_env(root)
        mc = self.work / "sendmail.mc"
        mc.write_text(
            f"""divert(0)dnl
include(`{root}/usr/share/sendmail/cf/m4/cf.m4')dnl
VERSIONID(`relayd bounce factory')dnl
OSTYPE(`linux')dnl
define(`QUEUE_DIR', `{queue}')dnl
define(`STATUS_FILE', `{self.work}/statistics')dnl
define(`ALIAS_FILE', `')dnl
define(`confHOST_STATUS_DIRECTORY', `')dnl
define(`confPID_FILE', `{self.work}/sendmail.pid')dnl
define(`confDONT_PROBE_INTERFACES', `True')dnl
define(`confTO_QUEUERETURN', `{self.queuereturn}')dnl
define(`confTO_QUEUEWARN', `{self.queuewarn}')dnl
define(`confRUN_AS_USER', `root')dnl
define(`confDEF_USER_ID', `smmta:smmta')dnl
define(`confCW_FILE', `')dnl
define(`confMIN_QUEUE_AGE', `0')dnl
define(`confDOMAIN_NAME', `{self.hostname}')dnl
DAEMON_OPTIONS(`Port=smtp,Addr={self.address},Name=MTA')dnl
CLIENT_OPTIONS(`Family=inet,Addr={self.address}')dnl
FEATURE(`promiscuous_relay')dnl
FEATURE(`accept_unresolvable_domains')dnl
MAILER(`smtp')dnl
"""
        )
        self.config = self.work / "sendmail.cf"
        with self.config.open("w") as out:
            subprocess.run(["m4", str(mc)], stdout=out, check=True, stderr=subprocess.DEVNULL)
        self.config.chmod(0o644)
        _run(str(self.binary), "-C", str(self.config), "-bd", "-q2s", env=self.env)

    queuereturn = "1s"
    queuewarn = "1h"

    def flush(self) -> None:
        _run(str(self.binary), "-C", str(self.config), "-q", env=self.env, check=False)

    def stop(self) -> None:
        pid = self.work / "sendmail.pid"
        if pid.exists():
            _run("kill", pid.read_text().split()[0], check=False)


class OpenSmtpd(Mta):
    """Debian's opensmtpd, unpacked privately; its compiled-in spool /var/spool/smtpd is on
    the factory namespace's private tmpfs."""

    def start(self) -> None:
        root = self.work.parent / "root"
        self.work.mkdir(parents=True, exist_ok=True)
        # its compiled-in chroot is /var/lib/opensmtpd/empty: a private tmpfs on /var/lib
        _run("mount", "-t", "tmpfs", "tmpfs", "/var/lib")
        Path("/var/lib/opensmtpd/empty").mkdir(parents=True)
        self.config = self.work / "smtpd.conf"
        self.config.write_text(
            f"""queue ttl {self.ttl}
bounce warn-interval {self.warn}
listen on {self.address} port 25 hostname {self.hostname}
action "out" relay helo {self.hostname} src {self.address}
match from src 127.0.0.0/8 for any action "out"
match from local for any action "out"
"""
        )
        self.config.chmod(0o600)
        self.env = library_env(root)
        self.binary = root / "usr/sbin/smtpd"
        self.process = subprocess.Popen(
            [str(self.binary), "-d", "-f", str(self.config)],
            env=self.env,
            stdout=(self.work / "smtpd.log").open("w"),
            stderr=subprocess.STDOUT,
        )

    ttl = "3s"
    warn = "1h"

    def flush(self) -> None:
        _run(str(self.work.parent / "root/usr/sbin/smtpctl"), "schedule", "all", env=self.env, check=False)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        _run("umount", "/var/lib", check=False)


class EximDelays(Exim):
    """Exim retrying for an hour and warning about the delay after two seconds."""

    delay_warning = "2s"
    retry = "F,1h,2s"


class SendmailDelays(Sendmail):
    """Sendmail keeping mail for an hour and warning after a second (Timeout.queuewarn)."""

    queuereturn = "1h"
    queuewarn = "1s"


class OpenSmtpdDelays(OpenSmtpd):
    """OpenSMTPD keeping mail for an hour and warning after a second."""

    ttl = "1h"
    warn = "1s"


#: what each family needs from Debian beyond the machine's own packages
PACKAGES = {
    "exim": ["exim4-daemon-light", "exim4-base", "exim4-config", "libidn12"],
    "sendmail": ["sendmail-bin", "sendmail-base", "sendmail-cf", "libwrap0"],
    "opensmtpd": ["opensmtpd"],
}


def unpack(debs: Path, root: Path, packages: list[str]) -> None:
    """``apt-get download`` the packages (once) and unpack them under ``root``."""
    debs.mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    have = {p.name.split("_", 1)[0] for p in debs.glob("*.deb")}
    missing = [p for p in packages if p not in have]
    if missing:
        subprocess.run(["apt-get", "download", *missing], cwd=debs, check=True, capture_output=True)
    for deb in debs.glob("*.deb"):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)


def library_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = f"{root}/usr/lib/x86_64-linux-gnu:{root}/lib/x86_64-linux-gnu"
    return env


def wait_for_port(address: str, port: int = 25, timeout: float = 20.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((address, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on {address}:{port}")
