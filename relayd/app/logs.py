"""Logging setup: one line per event, plain text or JSON.

Key lines (a transaction accepted or refused, a delivery attempt) carry their facts as ``extra={"fields":
{...}}`` -- queue id, account, list, recipient domain, outcome, status, latency -- so the JSON form answers
"what happened to this message?" with a ``jq`` filter, and the text form stays readable. Never log a
password or a message body: the fields are chosen at the call sites, nothing dumps whole objects.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # Neither format names the caller's file, line, thread or process: don't make every record look them
    # up (a stack walk per record; the logging HOWTO's "Optimization" section). A delivery line is
    # written for every copy, thousands a second under load.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    # aiosmtpd logs every command at INFO ("mail.log"); that is protocol chatter, DEBUG for us
    logging.getLogger("mail.log").setLevel(logging.WARNING if root.level > logging.DEBUG else logging.DEBUG)
