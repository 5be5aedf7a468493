"""``relayd inbox list|show|done`` and ``relayd dmarc summary``: the postmaster's desk on the command line.

``inbox list [--since 7d] [--kind K] [--state open|done] [--json]`` lists kept items, newest first;
``inbox show ID [--raw]`` prints an item's header fields and its text (the first ``text/plain`` part,
decoded), or with ``--raw`` the kept bytes as they came; ``inbox done ID`` marks it done (unknown ids exit
1). ``dmarc summary --domain D [--since 7d] [--json]`` prints the DMARC pass rates of a sending domain by
reporter and by source IP, relayd's own addresses (``[pools.NAME] addresses``) marked ``own``.

Everything an item shows was written by whoever mailed us, so text printed to a terminal has its control
characters (escape sequences could rewrite the screen or the window title) replaced by ``?``; ``--raw``
alone prints the bytes untouched, for a file or a mail reader.

Wiring: relayd.cli.main calls :func:`register` with its sub-parsers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime, timedelta
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

from relayd import config as config_mod
from relayd.cli.common import command, group, load_config, opened_store, run_on_store
from relayd.core.errors import ConfigError
from relayd.desk import dmarcstats
from relayd.desk.inbox import Kind
from relayd.store.models import InboxItem
from relayd.store.protocols import Store

__all__ = ["item_json", "register", "run_dmarc", "run_inbox", "safe_text"]

_CONTROLS = {c: "?" for c in [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F, *range(0x80, 0xA0)]}
#: Characters of an item's text shown by ``inbox show``; the rest is one ``--raw`` away.
_SHOW_MAX = 200_000


def safe_text(text: str) -> str:
    """``text`` with terminal control characters (ESC, C1, BEL, ...) replaced by ``?``; tabs, CR and
    newlines kept."""
    return text.translate(_CONTROLS)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``inbox`` and ``dmarc`` to ``relayd``'s sub-parsers."""
    actions = group(sub, "inbox", help="the postmaster inbox: mail to abuse@/postmaster@ kept for a person")
    sp = command(
        actions,
        "list",
        run_inbox,
        help="kept items, newest first",
        epilog="example: relayd inbox list --since 7d --config relayd.toml",
    )
    sp.add_argument("--since", help="only items received within this long (e.g. 7d)")
    sp.add_argument("--kind", choices=[k.value for k in Kind])
    sp.add_argument("--state", choices=["open", "done"])
    sp.add_argument("--json", action="store_true", help="one JSON object per item and line")
    sp = command(
        actions,
        "show",
        run_inbox,
        help="an item's header fields and text",
        epilog="example: relayd inbox show 12 --config relayd.toml",
    )
    sp.add_argument("id", type=int)
    sp.add_argument("--raw", action="store_true", help="the kept message bytes as they came")
    sp = command(
        actions,
        "done",
        run_inbox,
        help="mark an item done",
        epilog="example: relayd inbox done 12 --config relayd.toml",
    )
    sp.add_argument("id", type=int)

    actions = group(sub, "dmarc", help="DMARC aggregate reports received at dmarc@<inbound domain>")
    sp = command(
        actions,
        "summary",
        run_dmarc,
        help="pass rates of a sending domain by reporter and by source",
        epilog="example: relayd dmarc summary --domain acme.example --since 7d --config relayd.toml",
    )
    sp.add_argument("--domain", required=True)
    sp.add_argument("--since", default="7d", help="reports of the days within this long (default 7d)")
    sp.add_argument("--json", action="store_true", help="one JSON object per line")


def _since(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        seconds = config_mod.parse_duration(text)
    except ValueError as exc:
        raise ConfigError([f"--since: {exc}"]) from None
    return datetime.now(UTC) - timedelta(seconds=seconds)


def item_json(item: InboxItem) -> dict[str, object]:
    """An item as ``inbox list --json`` prints it."""
    return {
        "id": item.id,
        "received_at": item.received_at.isoformat(),
        "kind": item.kind,
        "state": item.state,
        "done_at": item.done_at.isoformat() if item.done_at else None,
        "source": item.source,
        "mail_from": item.mail_from,
        "from": item.from_header,
        "subject": item.subject,
        "date": item.date_header,
        "note": item.note,
        "size": item.size,
        "truncated": item.truncated,
    }


def run_inbox(args: argparse.Namespace) -> int:
    """``relayd inbox ...``: 0 ok, 1 no such item or a runtime failure, 2 usage or config error."""
    cfg = load_config(args)
    since = _since(getattr(args, "since", None))
    return run_on_store(cfg, lambda store: _inbox(args, store, since))


async def _inbox(args: argparse.Namespace, store: Store, since: datetime | None) -> int:
    if args.action == "list":
        items = await store.inbox_items(since=since, kind=args.kind, state=args.state)
        for item in items:
            if args.json:
                print(json.dumps(item_json(item), sort_keys=True))
            else:
                print(safe_text(_line(item)))
        if not items and not args.json:
            print("no inbox items", file=sys.stderr)
        return 0
    if args.action == "done":
        if not await store.mark_inbox_done(args.id, datetime.now(UTC)):
            print(f"relayd inbox done: no inbox item {args.id}", file=sys.stderr)
            return 1
        print(f"inbox item {args.id} done")
        return 0
    found = await store.get_inbox_item(args.id)
    if found is None or found.raw is None:
        print(f"relayd inbox show: no inbox item {args.id}", file=sys.stderr)
        return 1
    if args.raw:
        sys.stdout.flush()
        sys.stdout.buffer.write(found.raw)
        sys.stdout.buffer.flush()
        return 0
    print(safe_text(_show(found, found.raw)))
    return 0


def _line(item: InboxItem) -> str:
    when = item.received_at.strftime("%Y-%m-%d %H:%M")
    sender = item.from_header or item.mail_from or "-"
    return f"{item.id:>6}  {when}  {item.kind:<19} {item.state:<4}  {sender[:40]:<40}  {item.subject[:70]}"


def _show(item: InboxItem, raw: bytes) -> str:
    lines = [
        f"Item:      {item.id} ({item.kind}, {item.state}"
        + (f" since {item.done_at.isoformat()}" if item.done_at else "")
        + ")",
        f"Received:  {item.received_at.isoformat()} from {item.source}, MAIL FROM:<{item.mail_from}>",
    ]
    if item.note:
        lines.append(f"Note:      {item.note}")
    if item.truncated:
        lines.append(f"Size:      {item.size} bytes; only the first {len(raw)} were kept")
    msg = _parse(raw)
    for name in ("From", "To", "Cc", "Reply-To", "Subject", "Date", "Message-ID"):
        value = _header(msg, name) if msg is not None else ""
        if value:
            lines.append(f"{name + ':':<10} {value}")
    lines.append("")
    lines.append(_text(msg) if msg is not None else "(the message could not be parsed; see --raw)")
    return "\n".join(lines)


def _parse(raw: bytes) -> EmailMessage | None:
    try:
        parsed = BytesParser(policy=policy.default).parsebytes(raw)
    except Exception:
        return None
    return parsed if isinstance(parsed, EmailMessage) else None


def _header(msg: EmailMessage, name: str) -> str:
    try:
        value = msg.get(name)
    except Exception:  # a malformed field the default policy chokes on
        return "(unreadable)"
    return " ".join(str(value).split())[:500] if value is not None else ""


def _text(msg: EmailMessage) -> str:
    """The first ``text/plain`` part, decoded; else a pointer to ``--raw``."""
    try:
        body = msg.get_body(preferencelist=("plain",))
        if body is None:
            for part in msg.walk():
                if part.get_content_type() == "text/plain" and not part.is_multipart():
                    body = part
                    break
        if body is None:
            return "(no text/plain part; see --raw)"
        content = body.get_content()
    except Exception as exc:
        return f"(the text could not be decoded: {type(exc).__name__}; see --raw)"
    text = content if isinstance(content, str) else ""
    return text[:_SHOW_MAX] + ("\n(cut; see --raw)" if len(text) > _SHOW_MAX else "")


def run_dmarc(args: argparse.Namespace) -> int:
    """``relayd dmarc summary``: 0 ok (also with no reports), 1 runtime failure, 2 usage or config error."""
    cfg = load_config(args)
    since = _since(args.since)
    assert since is not None
    return asyncio.run(_dmarc(args, cfg, since))


async def _dmarc(args: argparse.Namespace, cfg: config_mod.Config, since: datetime) -> int:
    domain = args.domain.strip().lower().rstrip(".")
    if dmarcstats.report_domain(cfg, domain) is None:
        print(
            f"relayd dmarc summary: warning: {domain} is not a sending domain of this config", file=sys.stderr
        )
    async with opened_store(cfg) as store:
        counts = await store.dmarc_counts(domain, since.date())
    summary = dmarcstats.summarize(domain, since.date(), counts, dmarcstats.own_addresses(cfg))
    total = sum(p.total for p in summary.by_source)
    passed = sum(p.dmarc_pass for p in summary.by_source)
    if args.json:
        head = {
            "type": "summary",
            "domain": domain,
            "since": since.date().isoformat(),
            "reports": summary.reports,
            "total": total,
            "dmarc_pass": passed,
            "dmarc_pass_rate": round(passed / total, 4) if total else 0.0,
        }
        print(json.dumps(head, sort_keys=True))
        for rates in summary.by_reporter:
            print(json.dumps({"type": "reporter", **rates.as_json()}, sort_keys=True))
        for rates in summary.by_source:
            print(json.dumps({"type": "source", **rates.as_json()}, sort_keys=True))
        return 0
    rate = f"{100 * passed / total:.1f}%" if total else "-"
    print(
        f"DMARC reports for {domain} since {since.date().isoformat()}: {summary.reports} report(s),"
        f" {total} message(s), {rate} passing DMARC"
    )
    header = f"{'MESSAGES':>9} {'DMARC':>7} {'SPF-AL':>7} {'DKIM-AL':>7} {'SPF':>7} {'DKIM':>7}"
    print(f"\n{'BY REPORTER':<40} {header}")
    for p in summary.by_reporter:
        print(safe_text(f"{p.name[:40]:<40} {_rates(p)}"))
    print(f"\n{'BY SOURCE':<34} {'':<5} {header}")
    for p in summary.by_source:
        print(f"{p.name:<34} {'own' if p.own else '-':<5} {_rates(p)}")
    return 0


def _rates(p: dmarcstats.PassRates) -> str:
    cells = (p.dmarc_pass, p.spf_aligned, p.dkim_aligned, p.spf_pass, p.dkim_pass)
    return f"{p.total:>9} " + " ".join(f"{100 * p.rate(n):>6.1f}%" for n in cells)
