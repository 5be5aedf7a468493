"""Per-list send caps: at most N messages of one list to one recipient per day / week / month.

Mail-Maker's "do not disturb" rule (seeds/002). Windows are rolling (day = 86 400 s, week = 7 days,
month = 30 days), counted on accepted mail. The rule checks (``check_sends``); the count is made with the
message's sent-ledger rows (``record_sent(..., caps=)``), and the store makes check and count atomic, so two
submissions racing for the last slot can't both win: SQLite checks again in the ledger's transaction (the
loser gets 451 and, tried again, its 550), PostgreSQL reserves at the check. Either way a list message pays
one commit on the store for caps and ledger, not one each (a turn of the event loop fewer before its
``250``). A count is not given back if the queue commit then fails (451): the cap errs on the side of sending
less.
"""

from __future__ import annotations

from relayd.config import CapsConfig
from relayd.policy.model import Action, MessageRequest, Verdict
from relayd.store.protocols import SendCounterStore

DAY, WEEK, MONTH = 86_400, 7 * 86_400, 30 * 86_400


def cap_windows(caps: CapsConfig) -> dict[int, int]:
    windows = {DAY: caps.day, WEEK: caps.week, MONTH: caps.month}
    return {w: n for w, n in windows.items() if n is not None}


class CapsRule:
    name = "caps"

    def __init__(self, store: SendCounterStore) -> None:
        self._store = store

    async def check(self, req: MessageRequest, recipients: tuple[str, ...]) -> dict[str, Verdict]:
        if not req.caps or not recipients:
            return {}
        allowed = await self._store.check_sends(req.account, req.list_name, recipients, req.now, req.caps)
        return {
            addr: Verdict(
                Action.REJECT,
                self.name,
                "cap",
                f"550 5.7.1 <{addr}>: send cap of list {req.list_name or '(none)'} reached",
            )
            for addr in recipients
            if addr not in allowed
        }
