"""The bounce detectors, in the order they are tried: the registry.

After flufl.bounce's ``_scan.py``: most authoritative first, the first detector with a
verdict wins (see :mod:`relayd.reports.dsn.detection`). Adding a format is one new module
here and one place in :data:`DETECTORS`.

1. RFC 3464 delivery-status records (and DSN fields pasted into the text);
2. Amazon SES JSON notifications (a Complaint or Delivery is no bounce);
3. the screen for auto-replies and mail without any bounce signal;
4. Exim's X-Failed-Recipients header;
5. the generic free-text reader;
6. flufl.bounce's detectors (``source="flufl"``, marked as the weakest evidence);
7. the returned message's To: when the notice is clearly a bounce but names nobody.
"""

from __future__ import annotations

from typing import Final

from relayd.reports.dsn.detection import Detector
from relayd.reports.dsn.detectors import (
    amazon_ses,
    delivery_status,
    failed_recipients_header,
    flufl_bounce,
    notice_text,
    returned_original,
    unsignalled,
)

DETECTORS: Final[tuple[Detector, ...]] = (
    delivery_status,
    amazon_ses,
    unsignalled,
    failed_recipients_header,
    notice_text,
    flufl_bounce,
    returned_original,
)

__all__ = ["DETECTORS"]
