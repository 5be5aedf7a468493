"""The reload mechanism on its own, in one process: every registered part takes the same new config, and a
reload refused for any reason leaves every part on the old one; plus the config package's split (its public
names, its ``FILE: key.path: problem`` lines).

A real :class:`~relayd.app.daemon.Daemon` is started on loopback ports chosen by the kernel (store, queue,
listeners, web app, report parser), and :meth:`Daemon.reload` is called as the SIGHUP handler calls it.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme

import relayd.config
from relayd.app.daemon import Daemon
from relayd.app.reload import restart_sections
from relayd.config import Config, ConfigError, load
from relayd.edge.smtp.inbound import InboundHandler
from relayd.edge.smtp.submission import SubmissionHandler
from relayd.edge.web.app import LiveConfig
from relayd.edge.webhooks import WebhookDispatcher
from relayd.feedback.service import Feedback
from relayd.mail.dkim import keygen
from relayd.policy.reloaded import Reloaded
from relayd.policy.render import Renderer
from relayd.queue.scheduler import Scheduler
from tests.harness import config_text

_INBOUND = 'domains = ["bounces.example.test"]'


class _Seen:
    """A registered part that keeps what each reload handed it (the daemon's own parts keep only the last)."""

    def __init__(self) -> None:
        self.values: list[Reloaded] = []

    def reload(self, new: Reloaded) -> None:
        self.values.append(new)


def _tls_pair(tmp: Path, ca: trustme.CA, stem: str) -> tuple[Path, Path]:
    cert = ca.issue_cert("relayd.test", "127.0.0.1")
    cert_path, key_path = tmp / f"{stem}-cert.pem", tmp / f"{stem}-key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(cert_path)
    cert.private_key_pem.write_to_path(key_path)
    key_path.chmod(0o600)
    return cert_path, key_path


def _text(tmp: Path, tls: tuple[Path, Path], key: Path) -> str:
    cert, tls_key = tls
    dkim = f'\n[[dkim]]\ndomain = "acme.example.test"\nselector = "s1"\nkey_file = "{key}"\n'
    dkim += 'algorithm = "ed25519"\n'
    text = config_text(
        tmp,
        port=0,
        routes={"example.test": 9},  # never reached: nothing is sent
        submission_extra=f'tls_cert = "{cert}"\ntls_key = "{tls_key}"',
        extra=dkim,
    )
    return text.replace(_INBOUND, f'{_INBOUND}\ntls_cert = "{cert}"\ntls_key = "{tls_key}"')


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    key, _ = keygen("acme.example.test", "s1", "ed25519", tmp_path / "keys")
    tls = _tls_pair(tmp_path, trustme.CA(), "first")
    path = tmp_path / "relayd.toml"
    path.write_text(_text(tmp_path, tls, key))
    running = Daemon(load(path), path)
    try:
        await running.start()
    except BaseException:
        await running.close_partial()
        raise
    yield running
    await running.shutdown()


def _state(daemon: Daemon) -> dict[str, object]:
    """What each part of the daemon runs with now, read from the parts themselves."""
    assert daemon.scheduler is not None
    pipeline = daemon.handler.pipeline
    assert pipeline is not None
    return {
        "renderer.cfg": daemon.renderer.cfg,
        "renderer.signer": daemon.renderer.signer,
        "feedback.cfg": daemon.feedback.cfg,
        "handler.cfg": daemon.handler.cfg,
        "handler.tls_context": daemon.handler.tls_context,
        "handler.pipeline": pipeline,
        "inbound.cfg": daemon.inbound.cfg,
        "inbound.feedback.cfg": daemon.inbound.feedback.cfg,
        "inbound.tls_context": daemon.inbound.tls_context,
        "daemon.cfg": daemon.cfg,
    }


async def test_every_part_is_registered_once(daemon: Daemon) -> None:
    kinds = [type(part) for part in daemon.reloadables]
    assert sorted(k.__name__ for k in kinds) == sorted(
        k.__name__
        for k in (
            Renderer,
            Scheduler,
            Feedback,
            WebhookDispatcher,
            SubmissionHandler,
            InboundHandler,
            LiveConfig,
        )
    )


async def test_a_reload_hands_every_part_the_same_new_config(daemon: Daemon, tmp_path: Path) -> None:
    assert daemon.config_path is not None
    seen = _Seen()
    daemon.reloadables.append(seen)
    old = _state(daemon)
    text = daemon.config_path.read_text()
    daemon.config_path.write_text(text.replace('imprint = "ACME Ltd, 1 Test Street"', 'imprint = "ACME 2"'))

    assert daemon.reload()

    (new,) = seen.values
    assert new.cfg is daemon.cfg
    assert new.cfg.accounts["acme"].imprint == "ACME 2"
    now = _state(daemon)
    for name in ("renderer.cfg", "feedback.cfg", "handler.cfg", "inbound.cfg", "inbound.feedback.cfg"):
        assert now[name] is new.cfg, name
    # what was built from files is the one value's, loaded once: the key and certificates read again
    assert now["renderer.signer"] is new.signer
    assert now["handler.tls_context"] is new.submission_tls is not None
    assert now["inbound.tls_context"] is new.inbound_tls is not None
    assert now["handler.tls_context"] is not old["handler.tls_context"]
    pipeline = daemon.handler.pipeline
    assert pipeline is not None
    assert pipeline is not old["handler.pipeline"]
    assert pipeline.cfg is new.cfg
    assert pipeline.signer is new.signer
    assert pipeline.renderer is daemon.renderer  # shared across reloads


@pytest.mark.parametrize(
    ("breakage", "why"),
    [
        ("schema", "server.workerz: unknown key"),
        ("dkim key", "bad.pem: not a PEM private key"),
        ("tls certificate", "SSL"),
        ("example password", "accounts.acme.password_hash: still the example password"),
    ],
)
async def test_a_refused_reload_changes_no_part(
    daemon: Daemon, tmp_path: Path, caplog: pytest.LogCaptureFixture, breakage: str, why: str
) -> None:
    assert daemon.config_path is not None
    seen = _Seen()
    daemon.reloadables.append(seen)
    before = _state(daemon)
    text = daemon.config_path.read_text().replace("ACME Ltd, 1 Test Street", "ACME 2")
    if breakage == "schema":
        text = text.replace('hostname = "relayd.test"', 'hostname = "relayd.test"\nworkerz = 2')
    elif breakage == "dkim key":  # the file is there (the loader's check passes) but is no key
        bad = tmp_path / "bad.pem"
        bad.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
        bad.chmod(0o600)
        text += f'\n[[dkim]]\ndomain = "acme.example.test"\nselector = "s3"\nkey_file = "{bad}"\n'
    elif breakage == "tls certificate":  # only the inbound pair: the submission one would have loaded
        cert = tmp_path / "broken-cert.pem"
        cert.write_text("not a certificate\n")
        text = text.replace(
            f'{_INBOUND}\ntls_cert = "{tmp_path}/first-cert.pem"', f'{_INBOUND}\ntls_cert = "{cert}"'
        )
    else:  # the published password on a listener beyond loopback: refused as at start
        from relayd.core.passwords import EXAMPLE_HASHES

        text = text.replace('listen = ["127.0.0.1:0"]', 'listen = ["0.0.0.0:0"]', 1)
        hash_line = next(line for line in text.splitlines() if line.startswith("password_hash"))
        text = text.replace(hash_line, f'password_hash = "{sorted(EXAMPLE_HASHES)[0]}"', 1)
    daemon.config_path.write_text(text)

    assert not daemon.reload()

    assert any(why in r.getMessage() for r in caplog.records if "reload refused" in r.getMessage())
    assert seen.values == []
    now = _state(daemon)
    for name, value in before.items():
        assert now[name] is value, name
    assert daemon.cfg.accounts["acme"].imprint == "ACME Ltd, 1 Test Street"


async def test_webhooks_restart_with_the_new_endpoints(
    daemon: Daemon, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The dispatcher restarts itself in a task (a reload does not wait for POSTs in flight); a secret it
    cannot use then leaves it stopped, logged, and the daemon still shuts down."""
    assert daemon.config_path is not None
    caplog.set_level(logging.INFO, logger="relayd.edge.webhooks")
    secret = tmp_path / "hook.secret"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    text = daemon.config_path.read_text()
    hook = f'\n[[accounts.acme.webhooks]]\nurl = "http://127.0.0.1:9/hook"\nsecret_file = "{secret}"\n'
    daemon.config_path.write_text(text + hook)

    def logged(line: str) -> bool:
        return any(line in r.getMessage() for r in caplog.records)

    assert daemon.reload()
    for _ in range(200):
        if logged("webhooks: 1 endpoint(s) started"):
            break
        await asyncio.sleep(0.01)
    assert logged("webhooks: 1 endpoint(s) started")

    secret.write_text("")  # the loader checks that it exists and is private; the dispatcher reads it
    assert daemon.reload()
    for _ in range(200):
        if logged("webhooks not restarted after reload"):
            break
        await asyncio.sleep(0.01)
    assert logged(f"{secret} is empty")


def test_restart_sections_ignore_renewed_certificates(tmp_path: Path) -> None:
    base = {"submission": {"listen": ["127.0.0.1:2525"]}, "store": {"path": str(tmp_path / "a.db")}}
    old = Config.model_validate(base)
    renewed = Config.model_validate(
        {**base, "submission": {"listen": ["127.0.0.1:2525"], "tls_cert": "c.pem", "tls_key": "k.pem"}}
    )
    moved = Config.model_validate({**base, "store": {"path": str(tmp_path / "b.db")}})
    assert restart_sections(old, renewed) == []
    assert restart_sections(old, moved) == ["store"]


# --- the config package ------------------------------------------------------------------------------------


def test_every_public_name_comes_from_one_module() -> None:
    """``from relayd.config import X`` keeps working for every name, and each is defined once."""
    homes: dict[str, str] = {}
    for module in ("values", "schema", "loading", "audit"):
        mod = importlib.import_module(f"relayd.config.{module}")
        for name in relayd.config.__all__:
            value = getattr(mod, name, None)
            if value is not None and getattr(value, "__module__", None) == mod.__name__:
                assert name not in homes, f"{name} defined in {homes[name]} and {module}"
                homes[name] = module
    for name in relayd.config.__all__:
        assert getattr(relayd.config, name) is not None, name


@pytest.mark.parametrize(
    ("toml", "line"),
    [
        ("[server]\nworkerz = 2\n", "server.workerz: unknown key"),
        ('[queue]\nretry_schedule = ["1m", "soon"]\n', "queue.retry_schedule[1]: expected a duration"),
        ('[submission]\nlisten = ["::1:25"]\n', "submission.listen[0]: IPv6 addresses need brackets"),
        ("[accounts.a]\ndomains = []\n", "accounts.a.domains: List should have at least 1 item"),
        ("[server\n", "(syntax): "),
    ],
)
def test_problems_name_file_and_key(tmp_path: Path, toml: str, line: str) -> None:
    path = tmp_path / "relayd.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert any(p.startswith(f"{path}: {line}") for p in caught.value.problems), caught.value.problems


def test_a_missing_key_file_shows_beside_a_schema_error(tmp_path: Path) -> None:
    """The file checks run on what validated, so one check-config run names both problems."""
    path = tmp_path / "relayd.toml"
    path.write_text(
        '[server]\nworkerz = 2\n\n[[dkim]]\ndomain = "a.test"\nselector = "s"\n'
        'key_file = "/nonexistent.pem"\n'
    )
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert caught.value.problems == [
        f"{path}: server.workerz: unknown key",
        f"{path}: dkim[0].key_file: no such file: /nonexistent.pem",
    ]
