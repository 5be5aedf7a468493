"""Reading relayd.toml: the schema, then the checks that need the filesystem; every problem found is
reported at once as ``FILE: key.path: problem`` (the contract of ``relayd check-config``).

Why the file checks here and not in the schema: a missing key file or a secret readable by others is a
problem of this host, not of the file's text, and it is reported beside the schema's problems (for the
parts of the file that validated) instead of one run of check-config later.
"""

from __future__ import annotations

import tomllib
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from relayd.config.schema import AccountConfig, Config, DkimConfig, ShapingConfig, ShapingFile
from relayd.core import secret
from relayd.core.errors import ConfigError


def _read_toml(path: Path) -> dict[str, Any]:
    """The file's TOML; :class:`ConfigError` naming the file for an unreadable file or bad syntax."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([f"{path}: (file): cannot read: {exc.strerror}"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: (syntax): {exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: (file): not UTF-8: {exc}"]) from exc


def load_shaping_file(path: Path) -> dict[str, ShapingConfig]:
    """Read a shaping file; raise :class:`ConfigError` naming this file and the key for every problem."""
    raw = _read_toml(path)
    try:
        return ShapingFile.model_validate(raw).shaping
    except ValidationError as exc:
        raise ConfigError(_problems(path, exc)) from exc


def _format_loc(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        else:
            parts.append(str(item))
    return ".".join(parts) or "(top level)"


def _problems(path: Path, exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = tuple(
            x for x in err["loc"] if not (isinstance(x, str) and ("[" in x or x.startswith("function-")))
        )
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        lines.append(f"{path}: {_format_loc(loc)}: {msg}")
    return lines


def _dkim_file_checks(path: Path, entries: typing.Iterable[tuple[int, DkimConfig]]) -> list[str]:
    """A missing key file of each (index in ``[[dkim]]``, entry)."""
    return [
        f"{path}: dkim[{i}].key_file: no such file: {d.key_file}"
        for i, d in entries
        if not d.key_file.is_file()
    ]


def _file_checks(path: Path, cfg: Config) -> list[str]:
    """Checks that need the filesystem, on a config that validated (or on what :func:`_salvaged_file_checks`
    could save of one that did not)."""
    problems = _dkim_file_checks(path, enumerate(cfg.dkim))
    for name, acct in cfg.accounts.items():
        if acct.password_file is not None and not acct.password_file.is_file():
            problems.append(f"{path}: accounts.{name}.password_file: no such file: {acct.password_file}")
        for i, hook in enumerate(acct.webhooks):
            if not hook.secret_file.is_file():
                problems.append(
                    f"{path}: accounts.{name}.webhooks[{i}].secret_file: no such file: {hook.secret_file}"
                )
    if cfg.delivery.shaping_file is not None:
        try:
            load_shaping_file(cfg.delivery.shaping_file)
        except ConfigError as exc:
            problems.extend(exc.problems)
    ca_file = cfg.delivery.tls_ca_file
    if ca_file is not None and not ca_file.is_file():
        problems.append(f"{path}: delivery.tls_ca_file: no such file: {ca_file}")
    for section in ("submission", "inbound"):
        for key in ("tls_cert", "tls_key"):
            value = getattr(getattr(cfg, section), key)
            if value is not None and not Path(value).is_file():
                problems.append(f"{path}: {section}.{key}: no such file: {value}")
    problems.extend(_secret_file_checks(path, cfg))
    return problems


def _secret_files(cfg: Config) -> list[tuple[str, Path]]:
    """(key path, file) of every secret the config names, apart from the server secret and DKIM keys
    (checked where they are loaded: relayd.core.secret, relayd.mail.dkim)."""
    files: list[tuple[str, Path]] = []
    for name, acct in cfg.accounts.items():
        if acct.password_file is not None:
            files.append((f"accounts.{name}.password_file", acct.password_file))
        hooks = enumerate(acct.webhooks)
        files += [(f"accounts.{name}.webhooks[{i}].secret_file", h.secret_file) for i, h in hooks]
    for section in ("submission", "inbound"):  # every listener's TLS key, wherever the section has one
        key = getattr(getattr(cfg, section), "tls_key", None)
        if key is not None:
            files.append((f"{section}.tls_key", Path(key)))
    return files


def _secret_file_checks(path: Path, cfg: Config) -> list[str]:
    """Secret files must be private to relayd's user (as the server secret is), and a password file must
    hold a password: an empty one would let an empty AUTH password in."""
    problems = []
    for key, file in _secret_files(cfg):
        mode = secret.exposed_mode(file)
        if mode is not None:
            problems.append(
                f"{path}: {key}: {file} is readable by group or others (mode {mode:04o}); chmod 600 it"
            )
    for name, acct in cfg.accounts.items():
        if acct.password_file is not None and acct.password_file.is_file():
            try:
                empty = not acct.password_file.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                problems.append(
                    f"{path}: accounts.{name}.password_file: cannot read {acct.password_file}: {exc}"
                )
                continue
            if empty:
                problems.append(f"{path}: accounts.{name}.password_file: {acct.password_file} is empty")
    return problems


_Section = typing.TypeVar("_Section", bound=BaseModel)


def _validated(model: type[_Section], value: object) -> _Section | None:
    try:
        return model.model_validate(value)
    except ValidationError:
        return None


def _salvaged_file_checks(path: Path, raw: dict[str, Any]) -> list[str]:
    """The file checks for the parts of ``raw`` that validate on their own, when the whole does not.

    Without them a missing key or password file shows only once every schema error is fixed, one run of
    check-config later. Each section, ``[[dkim]]`` entry and account is validated alone; one with a problem
    of its own is left out (that problem is reported already), and cross-section checks are not made."""
    sections: dict[str, Any] = {}
    for name, info in Config.model_fields.items():
        model = info.annotation
        if isinstance(model, type) and issubclass(model, BaseModel) and isinstance(raw.get(name), dict):
            section = _validated(model, raw[name])
            if section is not None:
                sections[name] = section
    raw_accounts = raw.get("accounts")
    accounts = {
        str(name): acct
        for name, value in (raw_accounts.items() if isinstance(raw_accounts, dict) else ())
        if (acct := _validated(AccountConfig, value)) is not None
    }
    raw_dkim = raw.get("dkim")
    dkim = [
        (i, entry)
        for i, value in enumerate(raw_dkim if isinstance(raw_dkim, list) else ())
        if (entry := _validated(DkimConfig, value)) is not None
    ]
    partial = Config.model_construct(**sections, accounts=accounts, dkim=[], source=path)
    return [*_dkim_file_checks(path, dkim), *_file_checks(path, partial)]


def load(path: Path | str) -> Config:
    """Read and validate ``path``; raise :class:`ConfigError` listing every problem found."""
    path = Path(path)
    raw = _read_toml(path)
    try:
        cfg = Config.model_validate({**raw, "source": path})
    except ValidationError as exc:
        raise ConfigError([*_problems(path, exc), *_salvaged_file_checks(path, raw)]) from exc
    problems = [*_limit_checks(path, cfg), *_file_checks(path, cfg)]
    if problems:
        raise ConfigError(problems)
    return cfg


def _limit_checks(path: Path, cfg: Config) -> list[str]:
    """Limits that only make sense together: a message that may be accepted must fit in the DATA budget
    on its own, or its client would get 452 and retry it forever."""
    budget = cfg.server.max_data_in_flight
    return [
        f"{path}: server.max_data_in_flight: {budget} bytes is less than {section}.max_message_size ({size})"
        for section, size in (
            ("submission", cfg.submission.max_message_size),
            ("inbound", cfg.inbound.max_message_size),
        )
        if size > budget
    ]
