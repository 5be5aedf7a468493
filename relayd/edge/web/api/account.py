"""``/api/v1/stats``: the account's sending figures and standing, as ``relayd account show`` gives them."""

from __future__ import annotations

from typing import Final

from aiohttp import web

from relayd.edge.web.api.context import API, KEY, PREFIX, Route, iso_time, json_response
from relayd.feedback import reputation
from relayd.store.models import utcnow


async def _stats(request: web.Request) -> web.Response:
    """The figures ``relayd account show`` gives, for the key's account, with the thresholds they are
    judged against."""
    key, api = request[KEY], request.app[API]
    t = api.cfg.policy.thresholds
    now = utcnow()
    r = await reputation.rates(api.store, key.account, now, window=t.window)
    state = await api.store.get_account_state(key.account)
    suspended = bool(state and state.suspended)
    return json_response(
        {
            "account": key.account,
            "since": iso_time(r.since),
            "until": iso_time(r.until),
            "sent": r.sent,
            "complaints": r.complaints,
            "hard_bounces": r.hard_bounces,
            "spamtraps": r.spamtraps,
            "complaint_rate": round(r.complaint_rate, 6),
            "hard_bounce_rate": round(r.hard_bounce_rate, 6),
            "suspended": suspended,
            "suspension": (
                {"reason": state.reason.value if state.reason else None, "since": iso_time(state.since)}
                if state is not None and suspended
                else None
            ),
            "thresholds": {
                "minimum_sent": t.minimum_sent,
                "complaint_warn": t.complaint_warn,
                "complaint_suspend": t.complaint_suspend,
                "hard_bounce_suspend": t.hard_bounce_suspend,
            },
        }
    )


#: (method, path, handler) of this resource, in the order of the package docstring
ROUTES: Final[tuple[Route, ...]] = (("GET", f"{PREFIX}/stats", _stats),)
