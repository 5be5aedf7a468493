"""SIGHUP: a new config for the running parts, all of it or none of it.

One mechanism: every part that follows the config (the renderer, the scheduler, feedback, the listeners'
handlers, the web app, the webhooks) is a :class:`Reloadable`, registered with the daemon as it starts, and
a reload calls each one's ``reload`` with the same :class:`~relayd.policy.reloaded.Reloaded` value.

All or nothing: :func:`prepare` loads and checks everything that can fail first (the config file, the
example-password refusal, every DKIM key, the listeners' TLS certificates). Only when all of it loaded does
a part change, and then each takes what it needs from that one value: no part reads a file again, so none
can fail half way through, or find a file changed since the others read it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from relayd import config
from relayd.config import Config
from relayd.edge.smtp.inbound import tls_context as inbound_tls_context
from relayd.edge.smtp.submission import tls_context as submission_tls_context
from relayd.mail.dkim import Signer, load_key
from relayd.policy.reloaded import Reloaded

__all__ = ["Reloadable", "load_signer", "prepare", "restart_sections"]

#: the sections whose change needs a restart: listen addresses, store and queue paths are bound or opened
#: once at start
_RESTART_SECTIONS = ("submission", "inbound", "http", "store", "queue")
#: keys of those sections that a reload applies anyway: the listeners read their TLS context for each new
#: connection, and :func:`prepare` re-reads the certificates
_RELOADED_KEYS: dict[str, frozenset[str]] = {
    "submission": frozenset({"tls_cert", "tls_key"}),
    "inbound": frozenset({"tls_cert", "tls_key"}),
}


class Reloadable(Protocol):
    """A running part that follows the config: it takes its share of ``new`` and cannot fail (everything
    that could was loaded by :func:`prepare`)."""

    def reload(self, new: Reloaded) -> None: ...


def load_signer(cfg: Config) -> Signer:
    """Every [[dkim]] key, loaded and checked before we accept any mail (a bad key fails the start)."""
    return Signer([load_key(d.domain, d.selector, d.key_file, d.algorithm) for d in cfg.dkim])


def prepare(path: Path) -> Reloaded:
    """Load ``path`` and everything its parts need from other files.

    Raises :class:`~relayd.core.errors.ConfigError` (every problem of the file, or the example password on
    a listener beyond loopback, as at start), :class:`~relayd.mail.dkim.DkimKeyError` (a key that does not
    load) or OSError (a certificate and key pair that does not load; ssl.SSLError is one)."""
    new = config.load(path)
    config.refuse_example_passwords(new)
    return Reloaded(
        cfg=new,
        signer=load_signer(new),
        # a renewed certificate is served from the next connection on
        submission_tls=submission_tls_context(new),
        inbound_tls=inbound_tls_context(new),
    )


def restart_sections(old: Config, new: Config) -> list[str]:
    """The sections that changed in a way only a restart applies (a renewed certificate is no reason)."""
    changed = []
    for key in _RESTART_SECTIONS:
        exclude = _RELOADED_KEYS.get(key, frozenset())
        if getattr(old, key).model_dump(exclude=exclude) != getattr(new, key).model_dump(exclude=exclude):
            changed.append(key)
    return changed
