"""Tests of launch/: its scripts are plain modules of that directory, so put it on sys.path."""

import sys
from pathlib import Path

LAUNCH_DIR = Path(__file__).resolve().parents[2] / "launch"
if str(LAUNCH_DIR) not in sys.path:
    sys.path.insert(0, str(LAUNCH_DIR))
