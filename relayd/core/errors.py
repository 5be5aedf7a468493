"""The exceptions relayd raises across module lines.

::

    RelaydError
     ├── ConfigError          the config file is unusable; carries every problem found, one line each
     ├── StorageError         the durable queue or a store could not do what was asked (disk full, locked,
     │                        corrupt); callers answer SMTP with 451 and never pretend success
     └── DeliveryError        one delivery attempt failed
          ├── TemporaryFailure   4xx, connection trouble, DNS timeout: retry on the schedule
          └── PermanentFailure   5xx, null MX, NXDOMAIN: record and stop

    SmtpError                 what the delivery SMTP client (relayd.queue.transport.smtpclient) raises; the
    transport
     │                        (relayd.queue.transport.client) maps each to a DeliveryError, so none leaves
     relayd.queue
     ├── SmtpReplyError       the server answered with an error code (``code``, ``message``)
     ├── SmtpConnectError     the connection could not be made (also a ConnectionError)
     ├── SmtpDisconnected     the connection was lost or the TLS handshake failed (also a ConnectionError)
     └── SmtpTimeout          no reply in time (also a TimeoutError)

Foreign exceptions (OSError, sqlite3.Error, dns.exception.DNSException) are mapped to these at the edge
with ``raise ... from``, so the core never has to know which library failed.
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


class SmtpError(Exception):
    """A failure of the delivery SMTP client; ``message`` is the text. Not a RelaydError: the transport maps
    it to a :class:`DeliveryError` before it leaves the queue, so nothing above ever catches it."""

    def __init__(self, message: str, /) -> None:
        super().__init__(message)
        self.message = message


class SmtpReplyError(SmtpError):
    """The server answered with an error code; ``code`` -1 marks a reply too broken to read (temporary)."""

    def __init__(self, code: int, message: str, /) -> None:
        super().__init__(message)
        self.code = code
        self.args = (code, message)


class SmtpConnectError(SmtpError, ConnectionError):
    """The TCP connection to the server could not be made (a ConnectionError, as callers test for one)."""


class SmtpDisconnected(SmtpError, ConnectionError):
    """The server closed the connection, or the TLS handshake failed, before the reply was read."""


class SmtpTimeout(SmtpError, TimeoutError):
    """The server did not answer in time (a TimeoutError, so timeouts are counted alike wherever raised)."""
