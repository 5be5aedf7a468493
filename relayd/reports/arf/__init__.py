"""ARF (RFC 5965) complaint parsing; Hotmail JMRP and plain forwarded complaints too.

``parse(raw)`` is pure: no config, store or secret; bad input gives ``is_arf=False``.
Attribution (checking the ``X-Relayd-ID`` it extracts) is a separate step.
"""

from relayd.reports.arf.model import ArfReport
from relayd.reports.arf.parse import parse

__all__ = ["ArfReport", "parse"]
