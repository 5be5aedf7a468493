"""Micro-benchmark of the message rewrite step: prepare/s and render/s for a ~5 KB multipart/alternative.

Run: ``.venv/bin/python bench/footer.py [--seconds 2]``.  Prints one line per measured call with the message
size, calls per second and microseconds per call; ``prepare`` includes the stdlib MIME parse.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import SMTP, compat32

from relayd.mail.rewrite import DEFAULT_HTML_TEMPLATE, DEFAULT_TEXT_TEMPLATE, FooterSpec, prepare

SPEC = FooterSpec(
    DEFAULT_TEXT_TEMPLATE,
    DEFAULT_HTML_TEMPLATE,
    "ACME Newsletter GmbH · Hauptstraße 1 · 10115 Berlin · HRB 12345 · Geschäftsführer: Erika Mustermann",
)


def sample_message() -> bytes:
    """A ~5 KB newsletter: multipart/alternative, UTF-8 text (QP) and HTML (QP)."""
    para = (
        "Liebe Leserin, lieber Leser, diese Woche gibt es Neuigkeiten über unsere Produkte, "
        "Veranstaltungen und Angebote. Schöne Grüße aus Berlin!\n"
    )
    msg = EmailMessage()
    msg["From"] = "ACME News <news@acme.example.test>"
    msg["To"] = "reader@example.test"
    msg["Subject"] = "Wochenrückblick"
    msg["List-Id"] = "<news.acme.example.test>"
    msg["Message-ID"] = "<bench.1@acme.example.test>"
    msg.set_content(para * 12, cte="quoted-printable")
    html_body = "<html><head><title>News</title></head><body>\n" + "<p>" + para + "</p>\n" * 1
    html_body = html_body + ("<p>" + para.strip() + "</p>\n") * 11 + "</body></html>\n"
    msg.add_alternative(html_body, subtype="html", cte="quoted-printable")
    return msg.as_bytes(policy=SMTP)


def measure(fn: Callable[[], object], seconds: float) -> tuple[int, float]:
    """Calls of ``fn`` within ``seconds``; returns (calls, elapsed)."""
    calls, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(50):
            fn()
        calls += 50
        now = time.perf_counter()
        if now >= deadline:
            return calls, now - start


def main() -> None:
    argp = argparse.ArgumentParser(description=__doc__)
    argp.add_argument("--seconds", type=float, default=2.0, help="time per measurement (default 2)")
    args = argp.parse_args()
    raw = sample_message()
    template = prepare(raw, SPEC, "spring:news:acme:relayd1")
    urls = [f"https://lists.acme.example.test/u/{i:08d}-abcdefghijklmnopqrstuvwxyz" for i in range(1000)]
    counter = iter(range(10**12))

    def render() -> bytes:
        i = next(counter) % 1000
        return template.render(
            unsubscribe_url=urls[i], unsubscribe_mailto=f"unsub+{i}@b.example.test", relayd_id=f"r{i}x"
        )

    out = render()
    print(f"message: {len(raw)} bytes in, {len(out)} bytes out, {template.footer_parts} footered parts")
    parser = BytesParser(policy=compat32)
    runs: list[tuple[str, Callable[[], object]]] = [
        ("prepare", lambda: prepare(raw, SPEC, "spring:news:acme:relayd1")),
        ("render", render),
        ("(stdlib parse alone, inside prepare)", lambda: parser.parsebytes(raw)),
    ]
    for name, fn in runs:
        calls, elapsed = measure(fn, args.seconds)
        print(f"{calls / elapsed:12,.0f}/s  {elapsed / calls * 1e6:8.1f} µs/call  {name}")


if __name__ == "__main__":
    main()
