"""``python -m relayd`` is the ``relayd`` command."""

import sys

from relayd.cli import main

sys.exit(main())
