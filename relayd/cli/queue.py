"""``relayd queue ...``: the queue tools a Postfix admin expects (postqueue, postsuper, postcat, qshape).

``list`` shows one row per recipient (the unit relayd delivers), ``summary`` counts them by destination and
age like qshape, ``cat`` prints what a recipient will receive, ``hold``/``release``/``retry``/``drop`` act
on recipients chosen by queue id, recipient domain, account (or recipient address, for drop).

Safe next to a running daemon: the commands open the queue shards directly, as the daemon's own processes
do (SQLite serialises the writers). The daemon learns of a change at its next queue scan (``[queue]
scan_interval``, a second by default): the scan reads the due index, so a retried or released recipient
is attempted then and a held one is no longer picked up. An attempt already in flight when a hold lands
finishes; its outcome is recorded (relayd.queue.store), never lost, never sent twice.

Holds are on disk (``state = 'held'``, ``held_by = 'operator'``) and survive restarts. Holds made by an
account's suspension (``held_by = 'suspension'``) are not the operator's to release: ``release`` leaves them
and says to reinstate the account, and reinstating leaves the operator's holds alone.

Every hold, release, retry and drop is an event in the policy store (kind ``queue_hold``, ``queue_release``,
``queue_retry``, ``queue_drop``; evidence ``who = "cli"``, the user, the counts and queue ids), one per
account it touched, so the account's webhooks see it (relayd.edge.webhooks).

Exit codes: 0 ok; 1 an unknown queue id (``ID: no such message`` on stderr; the other ids are acted on) or
a message whose copy cannot be shown; 2 usage (hold, release and drop without any selector: never the
whole queue by accident).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from relayd import config as config_mod
from relayd.cli.common import command, group, load_config, opened_store, operator_name, run_on_queue
from relayd.queue.shards import QueueShards
from relayd.queue.store import AGE_BUCKETS, Action, Affected, QueueEntry, Selection, State, View

__all__ = ["VIEWS", "register", "run"]

#: the names ``--state`` takes: the operator's views, and the states on disk that earlier releases took
VIEWS = tuple(v.value for v in View if v is not View.PENDING)

_BUCKET_NAMES = (*(str(b) for b in AGE_BUCKETS), f"{AGE_BUCKETS[-1]}+")

#: at most this many queue ids are named in one event (the count is always complete)
_EVENT_IDS = 100


def _state_of(row: QueueEntry, now: float) -> str:
    """The operator's name of a recipient's state: deferred, active, held, or its final state."""
    if row.state == State.QUEUED:
        return "deferred" if row.attempts > 0 and row.next_attempt > now else "active"
    return row.state


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _duration(text: str) -> float:
    """``--older-than``: the config's duration strings (``"30m"``, ``"2h"``, ``"5d"``); a bad one is a
    usage error (exit 2)."""
    try:
        return config_mod.parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


# --- show, list, summary ---------------------------------------------------------------------------------


def _message_json(row: Any) -> dict[str, Any]:
    """``relayd queue show``: a whole message with its recipients."""
    return {
        "queue_id": row.queue_id,
        "account": row.account,
        "mail_from": row.mail_from,
        "list": row.list_name,
        "created_at": _iso(row.created_at),
        "size": row.size,
        "recipients": [
            {
                "address": r.address,
                "state": r.state,
                "attempts": r.attempts,
                "next_attempt": _iso(r.next_attempt) if r.state == "queued" else None,
                "last_reply": r.last_reply,
            }
            for r in row.recipients
        ],
    }


async def _show(args: argparse.Namespace, queue: QueueShards, cfg: Any) -> int:
    code = 0
    for qid in args.queue_id:
        row = await queue.show(qid)
        if row is None:
            print(f"{qid}: no such message", file=sys.stderr)
            code = 1
            continue
        print(json.dumps(_message_json(row), indent=None if args.json else 2))
    return code


async def _list(args: argparse.Namespace, queue: QueueShards, cfg: Any) -> int:
    from relayd.queue.routing import Router

    router = Router(cfg.delivery)
    now = time.time()
    older: float | None = args.older_than
    selection = Selection(
        domain=args.domain,
        account=args.account,
        sender=args.sender,
        created_before=now - older if older is not None else None,
    )
    view = View(args.state) if args.state else View.PENDING
    rows = await queue.entries(view, selection, now=now, limit=args.limit)
    if rows and not args.json:
        print(
            f"{'QUEUE ID':<18} {'AGE':>5} {'TRIES':>5} {'STATE':<15} {'DESTINATION':<24} "
            "RECIPIENT  LAST REPLY"
        )
    for row in rows:
        domain = _domain(row.address)
        destination = router.configured_nexthop(domain) or domain
        state = _state_of(row, now)
        if args.json:
            doc = {
                "queue_id": row.queue_id,
                "index": row.index,
                "recipient": row.address,
                "domain": domain,
                "destination": destination,
                "state": state,
                "held_by": row.held_by if row.state == State.HELD else None,
                "account": row.account,
                "sender": row.mail_from,
                "list": row.list_name,
                "created_at": _iso(row.created_at),
                "age": round(now - row.created_at),
                "attempts": row.attempts,
                "next_attempt": _iso(row.next_attempt) if row.state == State.QUEUED else None,
                "last_reply": row.last_reply,
                "size": row.size,
            }
            print(json.dumps(doc))
        else:
            shown = f"held:{row.held_by or 'suspension'}" if row.state == State.HELD else state
            print(
                f"{row.queue_id:<18} {_age(now - row.created_at):>5} {row.attempts:>5} {shown:<15} "
                f"{destination:<24} <{row.address}>  {row.last_reply or '-'}"
            )
    return 0


async def _summary(args: argparse.Namespace, queue: QueueShards, cfg: Any) -> int:
    now = time.time()
    tables: dict[str, dict[str, list[int]]] = {"deferred": {}, "pending": {}}
    for domain, deferred, bucket, n in await queue.shape(now):
        for name in ("deferred", "pending") if deferred else ("pending",):
            counts = tables[name].setdefault(domain, [0] * len(_BUCKET_NAMES))
            counts[bucket] += n
    for name, title in (
        ("deferred", "deferred recipients (tried, waiting for their next attempt)"),
        ("pending", "all pending recipients (active, deferred and held)"),
    ):
        table = tables[name]
        total = [sum(col) for col in zip(*table.values(), strict=True)] if table else [0] * len(_BUCKET_NAMES)
        ordered = sorted(table.items(), key=lambda kv: (-sum(kv[1]), kv[0]))
        if args.json:
            rows: list[tuple[str | None, list[int]]] = [(None, total), *ordered]
            for key, counts in rows:
                doc = {
                    "queue": name,
                    "domain": key,
                    "total": sum(counts),
                    "buckets": dict(zip(_BUCKET_NAMES, counts, strict=True)),
                }
                print(json.dumps(doc))
            continue
        width = max([24, *(len(d) for d in table)])
        print(f"{title}, by destination domain and age in minutes")
        print(f"{'':>{width}} {'T':>6}" + "".join(f" {b:>5}" for b in _BUCKET_NAMES))
        for domain, counts in [("TOTAL", total), *ordered]:
            print(f"{domain:>{width}} {sum(counts):>6}" + "".join(f" {c:>5}" for c in counts))
        print()
    return 0


# --- cat ---------------------------------------------------------------------------------------------------


async def _cat(args: argparse.Namespace, queue: QueueShards, cfg: Any) -> int:
    from relayd.core.models import DueRecipient

    shard = await queue.shard_of(args.queue_id)
    row = await shard.show(args.queue_id) if shard is not None else None
    if shard is None or row is None:
        print(f"{args.queue_id}: no such message", file=sys.stderr)
        return 1
    if args.recipient is not None:
        matches = [r for r in row.recipients if r.address.lower() == args.recipient.lower()]
        if not matches:
            print(f"{args.queue_id}: no recipient <{args.recipient}>", file=sys.stderr)
            return 1
        rcpt = matches[0]
    else:  # the first recipient still to be delivered, else the first
        pending = [r for r in row.recipients if r.state in (State.QUEUED, State.HELD)]
        rcpt = (pending or list(row.recipients))[0]
    stored = await shard.recipient_data(row.queue_id, rcpt.index)
    if stored is None:
        print(
            f"{args.queue_id}: the message is no longer kept (every recipient is finished)", file=sys.stderr
        )
        return 1
    data = stored.data
    if stored.render:
        item = DueRecipient(
            row.queue_id,
            rcpt.index,
            rcpt.address,
            rcpt.attempts,
            row.account,
            row.mail_from,
            row.created_at,
            row.list_name,
            row.msg_class,
        )
        try:
            data = await _render(cfg, item, stored.data)
            print(
                f"# {row.queue_id}: the copy for <{rcpt.address}> as delivery makes it "
                "(its DKIM t= and signature are made again at each attempt)",
                file=sys.stderr,
            )
        except Exception as exc:  # the stored bytes are still worth showing: say what they are
            print(
                f"# {row.queue_id}: the message as stored; each recipient's copy (unsubscribe link, trace "
                f"token, DKIM signature) is made at delivery and could not be made here: {exc}",
                file=sys.stderr,
            )
    else:
        print(f"# {row.queue_id}: the message as stored and delivered", file=sys.stderr)
    if args.headers:
        end = data.find(b"\r\n\r\n")
        data = data if end < 0 else data[: end + 2]
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return 0


async def _render(cfg: Any, item: Any, data: bytes) -> bytes:
    """The copy delivery would make for ``item``, by delivery's own code (relayd.policy.render).

    Raises when it cannot be made here: no server secret yet (never created by this command), a DKIM key
    this user may not read."""
    from relayd.core.secret import load_or_create
    from relayd.mail.dkim import Signer, load_key
    from relayd.policy.render import Renderer

    if not Path(cfg.server.secret_file).exists():
        raise FileNotFoundError(f"no server secret at {cfg.server.secret_file}")
    secret = load_or_create(cfg.server.secret_file)
    signer = Signer([load_key(d.domain, d.selector, d.key_file, d.algorithm) for d in cfg.dkim])
    return b"".join(await Renderer(cfg, secret, signer).render(item, data))


# --- hold, release, retry, drop ----------------------------------------------------------------------------

_DONE = {Action.HOLD: "held", Action.RELEASE: "released", Action.RETRY: "due now", Action.DROP: "dropped"}


async def _act(args: argparse.Namespace, queue: QueueShards, cfg: Any) -> int:
    action = Action(args.action)
    domain = getattr(args, "domain", None)
    account = getattr(args, "account", None)
    recipient = getattr(args, "recipient", None)
    code = 0
    known: list[str] = []
    for qid in args.queue_id:
        if await queue.shard_of(qid) is None:
            print(f"{qid}: no such message", file=sys.stderr)
            code = 1
        else:
            known.append(qid)
    if args.queue_id and not known:
        return code  # every id named was unknown: an empty selection would mean the whole queue
    selection = Selection(queue_ids=tuple(known), domain=domain, account=account, recipient=recipient)
    affected = await queue.operate(action, selection)
    changed = [a for a in affected if a.changed]
    print(f"{len(changed)} recipient(s) {_DONE[action]}")
    kept: dict[str, int] = defaultdict(int)
    for a in affected:
        if not a.changed:
            kept[a.account] += 1
    for acct, n in sorted(kept.items()):
        print(
            f"relayd queue release: {n} recipient(s) of account {acct} are held because the account is "
            f"suspended; `relayd account reinstate {acct}` releases them",
            file=sys.stderr,
        )
    await _record(cfg, action, changed, selection)
    return code


async def _record(cfg: Any, action: Action, changed: list[Affected], selection: Selection) -> None:
    """One event per account touched (its webhooks see it), or one without an account if none was."""
    from relayd.store import Event

    by_account: dict[str | None, list[Affected]] = defaultdict(list)
    for a in changed:
        by_account[a.account].append(a)
    if not by_account:
        by_account[None] = []
    criteria = {
        "queue_ids": list(selection.queue_ids),
        "domain": selection.domain,
        "account": selection.account,
        "recipient": selection.recipient,
    }
    now = dt.datetime.now(dt.UTC)
    events = []
    for account, rows in by_account.items():
        ids = sorted({a.queue_id for a in rows})
        addresses = {a.address for a in rows}
        evidence = {
            "who": "cli",
            "user": operator_name(),
            "action": str(action),
            "recipients": len(rows),
            "messages": len(ids),
            "queue_ids": ids[:_EVENT_IDS],
            "selection": {k: v for k, v in criteria.items() if v},
        }
        events.append(
            Event(
                now,
                f"queue_{action}",
                account=account,
                address=next(iter(addresses)) if len(addresses) == 1 else None,
                reason="operator",
                queue_id=ids[0] if len(ids) == 1 else None,
                evidence=json.dumps(evidence),
            )
        )
    async with opened_store(cfg) as store:
        await store.record_events(events)


# --- wiring ------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    if args.action in ("hold", "release", "drop") and not (
        args.queue_id or args.domain or getattr(args, "account", None) or getattr(args, "recipient", None)
    ):
        what = (
            "ID..., --domain D or --recipient R"
            if args.action == "drop"
            else "ID..., --domain D or --account A"
        )
        print(f"relayd queue {args.action}: name what to {args.action}: {what}", file=sys.stderr)
        return 2
    fn = {"show": _show, "list": _list, "summary": _summary, "cat": _cat}.get(args.action, _act)
    cfg = load_config(args)
    return run_on_queue(cfg, lambda queue: fn(args, queue, cfg))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``queue`` and its ``list``, ``summary``, ``cat``, ``hold``, ``release``, ``retry``, ``drop`` and
    ``show`` to ``relayd``'s sub-parsers."""
    q = group(sub, "queue", help="inspect and act on the queue")
    sp = command(q, "list", run, help="one row per unfinished recipient (postqueue -p, mailq)")
    sp.add_argument("--json", action="store_true", help="one JSON object per recipient and line")
    sp.add_argument(
        "--state",
        choices=VIEWS,
        help="deferred (tried, waiting), active (due or never tried), held, done (finished); "
        "or a state on disk: queued, delivered, failed, expired, dropped",
    )
    sp.add_argument("--domain", help="recipient domain")
    sp.add_argument("--sender", help="envelope sender (MAIL FROM)")
    sp.add_argument("--account")
    sp.add_argument("--older-than", type=_duration, help="messages older than this, e.g. 2h")
    sp.add_argument("--limit", type=int, default=1000)

    sp = command(q, "summary", run, help="recipients by destination domain and age, like qshape")
    sp.add_argument("--json", action="store_true")

    sp = command(q, "cat", run, help="print a queued message as it will go out (postcat -q)")
    sp.add_argument("queue_id")
    sp.add_argument("--headers", action="store_true", help="only the header block")
    sp.add_argument("--recipient", help="whose copy (default: the first recipient still queued)")

    for name, helptext in (
        ("hold", "hold recipients until released, also across restarts (postsuper -h)"),
        ("release", "release recipients an operator held (postsuper -H)"),
        ("retry", "make deferred recipients due now: all, or those selected (postqueue -f / -s)"),
        ("drop", "drop unfinished recipients (postsuper -d)"),
    ):
        sp = command(q, name, run, help=helptext)
        sp.add_argument("queue_id", nargs="*")
        sp.add_argument("--domain", help="recipient domain")
        if name in ("hold", "release"):
            sp.add_argument("--account")
        if name == "drop":
            sp.add_argument("--recipient", help="recipient address")

    sp = command(q, "show", run, help="show messages and their recipients")
    sp.add_argument("queue_id", nargs="*")
    sp.add_argument("--json", action="store_true")
