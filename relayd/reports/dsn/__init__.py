"""Bounce (DSN) parsing and classification.

``classify(raw)`` reads any message and says whether it is a delivery report, which
recipients it names and why each failed (sisimai v5 reason names); ``classify_reply``
applies the same table to our own synchronous SMTP failures. Both are pure.
"""

from relayd.reports.dsn.classifier import classify
from relayd.reports.dsn.model import BouncedRecipient, DsnReport
from relayd.reports.dsn.reasons import classify_reply

__all__ = ["BouncedRecipient", "DsnReport", "classify", "classify_reply"]
