"""Make the plugin importable when its tests run from a source checkout (not installed)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
