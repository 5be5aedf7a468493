"""The exceptions relayd raises across module lines.

::

    RelaydError
     ├── ConfigError          the config file is unusable; carries every problem found, one line each
     ├── StorageError         the durable queue or a store could not do what was asked (disk full, locked,
     │                        corrupt); callers answer SMTP with 451 and never pretend success
     └── DeliveryError        one delivery attempt failed
          ├── TemporaryFailure   4xx, connection trouble, DNS timeout: retry on the schedule
          └── PermanentFailure   5xx, null MX, NXDOMAIN: record and stop

Foreign exceptions (OSError, sqlite3.Error, aiosmtplib.SMTPException, dns.exception.DNSException) are
mapped to these at the edge with ``raise ... from``, so the core never has to know which library failed.
"""

from __future__ import annotations


class RelaydError(Exception):
    """Base of every relayd error."""


class ConfigError(RelaydError):
    """The config file has problems; ``problems`` are ``"FILE: key.path: problem"`` lines."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class StorageError(RelaydError):
    """A durable write or read failed; the caller must not report success."""


class DeliveryError(RelaydError):
    """A delivery attempt failed; ``code`` and ``status`` are the SMTP reply, when there was one."""

    def __init__(
        self,
        message: str,
        code: int | None = None,
        status: str | None = None,
        *,
        command: str | None = None,
        text: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.command = command  # "MAIL", "RCPT", "DATA" when the reply answered that command
        self.text = text  # the server's reply text, without code and enhanced status


class TemporaryFailure(DeliveryError):
    """Try again later (4xx reply, connection refused, timeout)."""


class PermanentFailure(DeliveryError):
    """Never try again (5xx reply, domain accepts no mail)."""
