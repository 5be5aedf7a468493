"""The HTML the unsubscribe endpoint serves: small pages, no scripts, no external resources.

Why inline strings and not template files: five short pages do not need a template engine or package data,
and keeping the markup next to :func:`html.escape` makes it easy to see that every value is escaped (the
address, list and account come from mail headers and config; a list named by a ``List-Id`` the sender made
up must not become markup).

Why the stylesheet is inline with a hash in the Content-Security-Policy: the page loads nothing from
anywhere (mail links are opened on phones on bad networks, and a page that fetches nothing leaks nothing),
and ``style-src 'sha256-...'`` lets exactly this stylesheet apply while ``default-src 'none'`` forbids
scripts, images, frames and every other style. The form posts to the page's own URL (no ``action``), which
``form-action 'self'`` allows.

Accessibility: one ``<main>`` landmark and one ``<h1>`` per page, a real ``<button>`` with a visible focus
ring, body text at 1.0625 rem, contrast above WCAG AA (4.5:1) in both light and dark schemes, and a layout
that reflows to 320 px wide.
"""

from __future__ import annotations

import base64
import hashlib
from html import escape
from typing import Protocol

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "Subject",
    "already_page",
    "confirm_page",
    "csp_allowing_form_target",
    "done_page",
    "error_page",
    "invalid_page",
    "mask_address",
    "not_asked_page",
    "optin_already_page",
    "optin_confirm_page",
    "optin_done_page",
    "optin_invalid_page",
    "optin_not_asked_page",
]

_CSS = """
:root { color-scheme: light dark; --bg: #f3f4f6; --card: #ffffff; --text: #1f2328; --muted: #4b5563;
  --accent: #1d4ed8; --accent-hover: #1e40af; --border: #d1d5db; }
@media (prefers-color-scheme: dark) {
  :root { --bg: #111418; --card: #1b2027; --text: #e6e8eb; --muted: #aeb4bd;
    --accent: #3b6fe0; --accent-hover: #5080ea; --border: #333a44; } }
* { box-sizing: border-box; }
html { font-size: 100%; }
body { margin: 0; min-height: 100vh; display: flex; align-items: center; justify-content: center;
  padding: 1.5rem; background: var(--bg); color: var(--text);
  font: 1.0625rem/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
main { width: 100%; max-width: 30rem; background: var(--card); border: 1px solid var(--border);
  border-radius: 12px; padding: 2rem 2rem 1.75rem; box-shadow: 0 1px 3px rgba(0, 0, 0, .08); }
h1 { font-size: 1.5rem; line-height: 1.25; margin: 0 0 1rem; }
p { margin: 0 0 1rem; }
strong { font-weight: 600; overflow-wrap: anywhere; }
.note { color: var(--muted); font-size: .9375rem; margin: 1.25rem 0 0; }
form { margin: 1.5rem 0 0; }
button { font: inherit; font-weight: 600; min-height: 2.75rem; padding: .625rem 1.5rem; border: 0;
  border-radius: 8px; background: var(--accent); color: #ffffff; cursor: pointer; }
button:hover { background: var(--accent-hover); }
button:focus-visible { outline: 3px solid var(--accent); outline-offset: 3px; }
"""

_CSS_HASH = base64.b64encode(hashlib.sha256(_CSS.encode()).digest()).decode()

#: Sent with every response. No ``script-src`` source at all: scripts are forbidden, inline or not.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'none'; "
    f"style-src 'sha256-{_CSS_HASH}'; "
    "img-src 'none'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


class Subject(Protocol):
    """Whom a page is about: a :class:`~relayd.store.models.SentRecord` or an ``UnsubscribeResult``."""

    @property
    def account(self) -> str: ...
    @property
    def list(self) -> str | None: ...
    @property
    def address(self) -> str: ...


def mask_address(address: str) -> str:
    """``jane.doe@example.test`` -> ``j***@example.test``: enough for the owner to recognise, not enough
    for whoever the link was forwarded to (or a screenshot) to learn the mailbox."""
    local, at, domain = address.rpartition("@")
    if not at or not local:
        return "***"
    return f"{local[0]}***@{domain}"


def _page(title: str, body: str) -> str:
    return (
        "<!doctype html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="robots" content="noindex, nofollow">\n'
        '<meta name="referrer" content="no-referrer">\n'
        f"<title>{escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n"
        f"<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )


def _what(record: Subject) -> str:
    """'<list> of <account>', or 'all mail of <account>' for an unnamed list (account scope)."""
    account = f"<strong>{escape(record.account)}</strong>"
    if record.list:
        return f"<strong>{escape(record.list)}</strong> of {account}"
    return f"all mail of {account}"


def _who(record: Subject) -> str:
    return f"<strong>{escape(mask_address(record.address))}</strong>"


def confirm_page(record: Subject) -> str:
    """The GET page: a question and one button. Nothing has changed yet (RFC 8058 §1: mail software and
    link scanners fetch URLs on their own, so a GET must never unsubscribe)."""
    return _page(
        "Unsubscribe",
        "<h1>Unsubscribe</h1>\n"
        f"<p>Unsubscribe {_who(record)} from {_what(record)}?</p>\n"
        '<form method="post">\n'
        '<button type="submit" name="confirm" value="yes">Unsubscribe</button>\n'
        "</form>\n"
        '<p class="note">Nothing changes until you press the button. '
        "To stay subscribed, just close this page.</p>",
    )


def done_page(record: Subject) -> str:
    """After a successful POST (button or one-click), also for a repeated one."""
    return _page(
        "Unsubscribed",
        "<h1>You are unsubscribed</h1>\n"
        f"<p>{_who(record)} will get no more mail from {_what(record)}.</p>\n"
        '<p class="note">Messages that were still waiting to be sent to this address have been '
        "cancelled. You can close this page.</p>",
    )


def already_page(record: Subject) -> str:
    """GET after the unsubscribe: say so instead of offering a button that would change nothing."""
    return _page(
        "Unsubscribed",
        "<h1>Already unsubscribed</h1>\n"
        f"<p>{_who(record)} gets no more mail from {_what(record)}.</p>\n"
        '<p class="note">You can close this page.</p>',
    )


def invalid_page() -> str:
    """400 for a token that is malformed, tampered with, or not (or no longer) in the sent ledger. Says
    nothing about which: the page must not help anyone probe for valid tokens."""
    return _page(
        "Link not valid",
        "<h1>This link is not valid</h1>\n"
        "<p>The unsubscribe link is incomplete or too old. Some mail programs break long links over two "
        "lines: copy the whole link, or use the unsubscribe link in a more recent message.</p>\n"
        '<p class="note">Nothing was changed.</p>',
    )


def not_asked_page() -> str:
    """400 for a POST whose body is neither the RFC 8058 pair nor our button's field."""
    return _page(
        "Nothing changed",
        "<h1>Nothing was changed</h1>\n"
        "<p>This request did not ask to unsubscribe. Open the unsubscribe link again and press the "
        "button.</p>",
    )


def error_page(status: int, heading: str, text: str) -> str:
    """Any other error (404, 405, 413, 503, 500): a heading and one sentence, never exception text."""
    return _page(f"{status} {heading}", f"<h1>{escape(heading)}</h1>\n<p>{escape(text)}</p>")


# --- consent: the double opt-in confirm pages, same look and rules as the unsubscribe pages ---


def optin_confirm_page(record: Subject) -> str:
    """GET /c/<token>: a question and one button. Nothing is recorded yet: mail scanners and link previews
    fetch every URL in a mail, and a consent a robot gave is no consent."""
    return _page(
        "Confirm subscription",
        "<h1>Confirm your subscription</h1>\n"
        f"<p>Send mail from {_what(record)} to {_who(record)}?</p>\n"
        '<form method="post">\n'
        '<button type="submit" name="confirm" value="yes">Confirm subscription</button>\n'
        "</form>\n"
        '<p class="note">Nothing happens until you press the button. '
        "If you did not ask for this, just close this page.</p>",
    )


def optin_done_page(record: Subject) -> str:
    """After the POST that recorded the consent (also for a repeated one)."""
    return _page(
        "Subscription confirmed",
        "<h1>Your subscription is confirmed</h1>\n"
        f"<p>{_who(record)} will get mail from {_what(record)}.</p>\n"
        '<p class="note">Every message has a link to unsubscribe again. You can close this page.</p>',
    )


def optin_already_page(record: Subject) -> str:
    """GET when the consent is already on file: say so instead of offering a button that changes nothing."""
    return _page(
        "Subscription confirmed",
        "<h1>Already confirmed</h1>\n"
        f"<p>{_who(record)} gets mail from {_what(record)}.</p>\n"
        '<p class="note">You can close this page.</p>',
    )


def optin_invalid_page() -> str:
    """400 for a confirm token that is malformed, tampered with, or not in the sent ledger (which one is not
    said: the page must not help anyone probe for valid tokens)."""
    return _page(
        "Link not valid",
        "<h1>This link is not valid</h1>\n"
        "<p>The confirmation link is incomplete or too old. Some mail programs break long links over two "
        "lines: copy the whole link, or sign up again to get a new one.</p>\n"
        '<p class="note">Nothing was recorded.</p>',
    )


def optin_not_asked_page() -> str:
    """400 for a POST that does not carry our button's field."""
    return _page(
        "Nothing recorded",
        "<h1>Nothing was recorded</h1>\n"
        "<p>This request did not confirm a subscription. Open the confirmation link again and press the "
        "button.</p>",
    )


def csp_allowing_form_target(origin: str) -> str:
    """:data:`CONTENT_SECURITY_POLICY` that also lets a form submission end at ``origin``.

    Why: browsers apply ``form-action`` to the redirects that follow a form submission too (CSP Level 3), so
    the confirm page's 303 to a list's ``redirect`` URL on another site would be blocked. ``origin`` is
    ``scheme://host[:port]`` from the config (host names and addresses only, see ``ListConfig.redirect``).
    """
    return CONTENT_SECURITY_POLICY.replace("form-action 'self'", f"form-action 'self' {origin}")
