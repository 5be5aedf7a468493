"""The endurance run, quick: a few thousand messages through relayd under kill -9, a full disk and a
misbehaving receiver (tests/endurance/run.py), in well under 90 s. Nothing accepted may be lost.

``RELAYD_ENDURANCE_SEED`` replays a run's fault schedule (timing still varies); the full run is
``python -m tests.endurance --messages 20000``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from tests.endurance.run import Plan, run


def test_quick_endurance_loses_nothing(tmp_path: Path) -> None:
    seed = int(os.environ.get("RELAYD_ENDURANCE_SEED") or random.randrange(1 << 30))
    ledger = run(Plan.quick(seed), tmp_path)
    print(ledger.render())
    assert ledger.lost == 0, ledger.lost_detail[:20]
    assert ledger.integrity == {"queue.db": "ok", "relayd.db": "ok"}
    assert ledger.accepted == ledger.messages - ledger.refused_5xx
    assert ledger.refused_5xx == 0, ledger.refusals
    assert ledger.unmarked == 0
    assert not ledger.anomalies
    # the faults really happened
    assert ledger.kills >= 2 and ledger.disk_full_phases >= 2, (ledger.kills, ledger.disk_full_phases)
    assert ledger.refused_4xx_disk_full > 0
    assert ledger.delivered > ledger.accepted * 0.8
    assert ledger.bounced >= ledger.expected_bounced > 0
    assert sum(ledger.sink_faults.values()) > 100
