"""Delivery with CHUNKING (RFC 3030): a real Postfix smtpd, which offers CHUNKING and PIPELINING, receives
from relayd and relays to an aiosmtpd sink.

Shown: relayd sends ``BDAT <n> LAST`` (Postfix counts the commands of each session and logs them at
disconnect), the message arrives unchanged (no dot-stuffing leaks, nothing lost), and a recipient Postfix
refuses at RCPT fails on its own with Postfix's reply while the next transaction on the connection goes
through.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Relayd, Sink, free_port, message, split_delivered, wait_until
from tests.postfix_instance import PostfixInstance
from tests.test_policy_e2e import queue_state

REFUSED = "refused@example.test"


@pytest.fixture
def postfix(sink: Sink) -> Iterator[PostfixInstance]:
    assert shutil.which("postfix") is not None, "Postfix is needed (.ci/run installs postfix)"
    assert os.geteuid() == 0, "a private Postfix instance needs root (its master drops privileges itself)"
    pf = PostfixInstance(
        free_port(),
        sink.port,
        domain="example.test",
        selector="unused",
        milter=False,
        main_cf=(
            f"smtpd_recipient_restrictions = check_recipient_access inline:{{ {REFUSED}=REJECT }},"
            " permit_mynetworks, reject\n"
        ),
    )
    pf.start()
    try:
        yield pf
    finally:
        pf.stop()


def test_bdat_to_postfix_delivers_unchanged_and_a_refused_rcpt_fails_alone(
    tmp_path: Path, sink: Sink, postfix: PostfixInstance
) -> None:
    body = "First line.\r\n.leading dot\r\n..two dots\r\n.\r\nlast line\r\n"
    with Relayd(tmp_path, routes={"example.test": postfix.port}) as relayd:
        rcpts = ["ok-1@example.test", REFUSED, "ok-2@example.test"]
        code, resp = relayd.submit(message("chunked", body), to=rcpts)
        assert code == 250, resp
        [queue_id] = re.findall(rb"queued as ([a-z2-7]{16})", resp)
        assert wait_until(lambda: sink.handler.count() == 2, timeout=30), postfix.log_tail()
        qid = queue_id.decode()
        assert wait_until(lambda: queue_state(relayd, qid)[REFUSED]["state"] == "failed")
        refused = queue_state(relayd, qid)[REFUSED]
        # Postfix's RCPT reply, blamed on RCPT (its reply to the BDAT that followed is not the cause)
        assert re.match(
            r"RCPT at 127\.0\.0\.1:\d+: 554 5\.7\.1 <refused@example\.test>: Recipient address "
            "rejected",
            refused["last_reply"],
        ), refused

    got = {m.rcpt_tos[0]: m for m in sink.messages}
    assert sorted(got) == ["ok-1@example.test", "ok-2@example.test"]
    for m in got.values():
        _, headers, delivered = split_delivered(m.data)
        assert delivered.startswith(body.encode()), delivered[:200]  # then the footer
        assert b"Subject: chunked\r\n" in headers

    # Postfix's smtpd logs each session's commands at disconnect (relayd's stop ended its pooled session),
    # through postlogd: the line may come a moment after relayd is gone. Relayd used BDAT, never DATA.
    def sessions_logged() -> list[str]:
        log = postfix.log.read_text().splitlines()
        return [line for line in log if " disconnect from " in line and " mail=" in line]  # not port probes

    assert wait_until(lambda: bool(sessions_logged()), timeout=10), postfix.log_tail()
    sessions = sessions_logged()
    assert sessions and all("bdat=" in line and " data=" not in line for line in sessions), sessions
