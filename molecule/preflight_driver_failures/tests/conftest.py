"""The shared failure-case harness (molecule/resources/failure_cases.py) on the import path."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "resources"))
