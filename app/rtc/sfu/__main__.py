"""`python -m app.rtc.sfu`: one SFU node (the same as `python -m app sfu`)."""

from __future__ import annotations

import sys

from app.rtc.sfu.node import run_node
from app.settings import settings_from_env

if __name__ == "__main__":
    sys.exit(run_node(settings_from_env()))
