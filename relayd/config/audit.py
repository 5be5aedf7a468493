"""What a config that loaded may still get wrong: the published example password, cheap password hashes,
a plain-HTTP unsubscribe URL, DANE without a validating resolver.

``serve`` refuses the example password on a listener beyond loopback (:func:`refuse_example_passwords`);
the rest works, and ``check-config`` prints it as warnings (:func:`warnings`).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from relayd.config.schema import Config
from relayd.config.values import is_loopback_host, parse_hostport
from relayd.core import passwords
from relayd.core.errors import ConfigError


def _listens_beyond_loopback(cfg: Config) -> list[str]:
    """The submission listen addresses reachable from other hosts (anything but 127.0.0.0/8, ::1 and
    ``localhost``; a wildcard such as 0.0.0.0 counts as reachable)."""
    specs = [*cfg.submission.listen, *cfg.submission.listen_tls]
    return [spec for spec in specs if not is_loopback_host(parse_hostport(spec)[0])]


def _example_password_keys(cfg: Config) -> list[str]:
    """Key paths of accounts that still have the example password of conf/relayd.toml and the README.

    Compared by hash string (the shipped hashes) and by a password_file's content; verifying the example
    password against every hash would cost a full scrypt check per account at every start."""
    keys = []
    for name, acct in cfg.accounts.items():
        if acct.password_hash in passwords.EXAMPLE_HASHES:
            keys.append(f"accounts.{name}.password_hash")
        elif acct.password_file is not None:
            try:
                text = acct.password_file.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError):
                continue
            if text == passwords.EXAMPLE_PASSWORD:
                keys.append(f"accounts.{name}.password_file")
    return keys


def refuse_example_passwords(cfg: Config) -> None:
    """Raise :class:`ConfigError` when an account keeps the example password and submission listens on
    more than loopback: that password is published, so the account would be open to anyone who can reach
    the port. On loopback it is allowed, so the example config runs as-is."""
    public = _listens_beyond_loopback(cfg)
    keys = _example_password_keys(cfg)
    if public and keys:
        raise ConfigError(
            [
                f"{cfg.source}: {key}: still the example password {passwords.EXAMPLE_PASSWORD!r} while"
                f" submission listens on {', '.join(public)}; set a new one (relayd account hash-password)"
                for key in keys
            ]
        )


def warnings(cfg: Config) -> list[str]:
    """``FILE: key.path: warning: ...`` lines: what works but should not stay (check-config prints them)."""
    out = [
        f"{cfg.source}: {key}: warning: still the example password {passwords.EXAMPLE_PASSWORD!r};"
        " set a new one (relayd account hash-password); serve refuses it on a non-loopback listener"
        for key in _example_password_keys(cfg)
    ]
    for name, acct in cfg.accounts.items():
        if acct.password_hash is None:
            continue
        h = passwords.parse_hash(acct.password_hash)
        if passwords.below_recommended_cost(h):
            out.append(
                f"{cfg.source}: accounts.{name}.password_hash: warning: N={h.n}, r={h.r}, p={h.p} is cheaper"
                " to attack than the recommended N=131072, r=8, p=1; make a new hash with"
                " relayd account hash-password"
            )
    out.extend(_public_url_warnings(cfg))
    if cfg.delivery.mode == "mx" and not cfg.delivery.nameservers:
        out.append(
            f"{cfg.source}: delivery.nameservers: warning: DANE is off: it takes TLSA records only from a"
            " DNSSEC-validating resolver, which must be named here (the system resolver is not trusted"
            " for that); MTA-STS and the TLS levels still apply"
        )
    return out


def _public_url_warnings(cfg: Config) -> list[str]:
    """A warning when ``[http] public_url`` is not HTTPS: RFC 8058 §3.1 says the one-click URI MUST be
    https, and mailbox providers ignore (or never offer) one-click unsubscribe for any other.

    A loopback URL warns too, saying that it is fine for a test there: it is what the example config runs
    with, and nobody outside this host could follow its links anyway, so it must not stay in production."""
    url = cfg.http.public_url
    parts = urlsplit(url)
    if parts.scheme.lower() == "https":
        return []
    advice = (
        "fine for a test on loopback; set the https:// address mail readers reach before sending real mail"
        if is_loopback_host(parts.hostname or "")
        else "serve it through a TLS-terminating proxy and set the https:// address here"
    )
    return [
        f"{cfg.source}: http.public_url: warning: {url} is not https://; mailbox providers ignore one-click"
        f" unsubscribe links that are not HTTPS (RFC 8058 3.1): {advice}"
    ]
