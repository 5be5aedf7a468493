"""A known sequence of submissions, drops, deliveries, bounces and complaints, then one scrape of /metrics
parsed with prometheus_client's own text parser: every family is there with the right values."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.harness import Relayd, Sink, message, wait_until
from tests.test_feedback_e2e import _arf, _dsn, _send_inbound


def _scrape(relayd: Relayd) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{relayd.http_port}/metrics", timeout=10).read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def _value(m: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **labels: str) -> float:
    return m.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def test_metrics_after_a_known_sequence(tmp_path: Path, sink: Sink) -> None:
    sink.handler.script["bounce@example.test"] = ["550 5.1.1 <bounce@example.test>: user unknown"]
    sink.handler.script["later@example.test"] = ["451 4.7.1 try later"]
    extra = '[policy]\ndiscard_patterns = ["abuse@*"]\n'
    with Relayd(tmp_path, routes={"example.test": sink.port}, extra=extra) as relayd:
        assert relayd.submit(message("ok"), to=["ok@example.test"])[0] == 250
        assert relayd.submit(message("bounce"), to=["bounce@example.test"])[0] == 250
        assert relayd.submit(message("later"), to=["later@example.test"])[0] == 250
        assert relayd.submit(message("discard"), to=["abuse@example.test"])[0] == 550  # refused at RCPT
        broken = (
            b"From: App <app@acme.example.test>\r\nSubject: broken\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed\r\n\r\nno boundary\r\n"
        )
        assert relayd.submit(broken, to=["mime@example.test"])[0] == 554
        # feedback: a hard-bounce DSN for one delivered message, a complaint for another
        assert relayd.submit(message("dsn"), to=["gone@example.test"])[0] == 250
        assert relayd.submit(message("arf"), to=["annoyed@example.test"])[0] == 250
        assert wait_until(lambda: sink.handler.count() == 3)  # ok, gone, annoyed
        by_rcpt = {m.rcpt_tos[0]: m for m in sink.messages}
        gone = by_rcpt["gone@example.test"]
        assert _send_inbound(relayd, gone.mail_from, _dsn("gone@example.test", gone.data))[0] == 250
        annoyed = by_rcpt["annoyed@example.test"]
        arf = _arf("annoyed@example.test", annoyed.data)
        assert _send_inbound(relayd, "abuse@bounces.example.test", arf, sender="fbl@isp.test")[0] == 250

        def settled() -> bool:
            m = _scrape(relayd)
            return (
                _value(m, "relayd_deliveries_total", outcome="bounced", domain="example.test") == 1
                and _value(m, "relayd_account_complaints_total", account="acme") == 1
                and _value(m, "relayd_deliveries_total", outcome="deferred", domain="example.test") >= 1
            )

        assert wait_until(settled)
        m = _scrape(relayd)
    assert _value(m, "relayd_submissions_total", outcome="accepted", reason="ok") == 5
    assert _value(m, "relayd_submissions_total", outcome="refused", reason="mime") == 1
    assert _value(m, "relayd_recipients_dropped_total", reason="discard") == 1
    assert _value(m, "relayd_deliveries_total", outcome="delivered", domain="example.test") == 3
    assert _value(m, "relayd_deliveries_total", outcome="bounced", domain="example.test") == 1
    assert _value(m, "relayd_account_sent_total", account="acme", **{"class": "bulk"}) == 5
    # the synchronous 550 and the DSN are both hard bounces of acme
    assert _value(m, "relayd_account_bounces_total", account="acme", type="hard") == 2
    assert _value(m, "relayd_dsn_received_total", kind="hard", attributed="yes") == 1
    assert _value(m, "relayd_arf_received_total", feedback_type="abuse", attributed="yes") == 1
    assert _value(m, "relayd_suppressions_added_total", reason="hard_bounce", scope="global") == 2
    assert _value(m, "relayd_suppressions_added_total", reason="complaint", scope="account") == 1
    assert _value(m, "relayd_smtp_accept_seconds_count") == 6  # every DATA, accepted or refused
    assert _value(m, "relayd_dkim_sign_seconds_count") == 0  # no key configured in this test
    assert _value(m, "relayd_delivery_seconds_count") == 4
    for family in (
        "relayd_queue_recipients",
        "relayd_queue_oldest_age_seconds",
        "relayd_suppression_entries",
    ):
        assert family in m, family
