"""What a config reload (SIGHUP) hands every running part: the new config, and what was built from the files
it names before any part changed.

Why one value for all: a reload is all or nothing. The daemon (relayd.app.reload) loads the config, the
DKIM keys and the listeners' TLS certificates first, and refuses the whole reload if any of them fails; only
then does each part take its share from this value. A part that read a key or certificate file again itself
could find it changed (or half written) since, and leave some parts on the old config and some on the new.
Why in this layer: the renderer, the lowest part that reloads, takes the DKIM signer from it.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from relayd.config import Config
from relayd.mail.dkim import Signer

__all__ = ["Reloaded"]


@dataclass(frozen=True, slots=True)
class Reloaded:
    """A config that validated, with its DKIM keys and listener certificates loaded."""

    cfg: Config
    #: every ``[[dkim]]`` key of ``cfg``
    signer: Signer
    #: the submission listeners' TLS context (STARTTLS and implicit TLS); None without a certificate
    submission_tls: ssl.SSLContext | None
    #: the inbound listener's STARTTLS context; None without a certificate
    inbound_tls: ssl.SSLContext | None
