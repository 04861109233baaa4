"""``python -m hlsim``: the loopback Hyperliquid simulator as a process (see ``hlsim.cli``)."""

import sys

from hlsim.cli import main

sys.exit(main())
