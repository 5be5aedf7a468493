"""Where the shared bounce corpus is, for every test that reads it.

``RELAYD_CORPUS`` when set, else ``shared/corpus`` next to the checkout (``../shared/corpus``), else
``/work/shared/corpus``: one resolution, so pointing the suite at another copy of the corpus moves every
test that reads it, not just some.
"""

from __future__ import annotations

import os
from pathlib import Path

CORPUS = Path(os.environ.get("RELAYD_CORPUS", Path(__file__).resolve().parents[2] / "shared" / "corpus"))
if not (CORPUS / "labels.jsonl").exists():
    CORPUS = Path("/work/shared/corpus")
