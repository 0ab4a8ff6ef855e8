"""``python -m logsink`` is the ``logsink`` command."""

import sys

from logsink.cli import main

sys.exit(main())
