"""What the scheduler asks of the policy layer, as protocols: the last look before an attempt and the copy
of each recipient.

Why protocols and not the classes: the scheduler needs one method of each, and tests (and a daemon without
a policy store) hand it their own; ``relayd.app.daemon`` wires the real ones (relayd.policy.dequeue,
relayd.policy.render).
"""

from __future__ import annotations

from typing import Protocol

from relayd.core.models import DueRecipient
from relayd.mail.chunks import Chunks
from relayd.policy.dequeue import DequeueVerdict


class Gate(Protocol):
    """The policy's last word before an attempt (relayd.policy.dequeue.DequeueCheck)."""

    async def check(self, item: DueRecipient) -> DequeueVerdict: ...


class CopyMaker(Protocol):
    """Makes a recipient's own copy from the stored message (relayd.policy.render: footer link, trace
    token, DKIM signature); the queue only knows that some messages need one."""

    async def render(self, item: DueRecipient, data: bytes) -> Chunks: ...
