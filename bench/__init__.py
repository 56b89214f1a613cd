"""peft-bench. Importing the package registers the `${arch:<role>}` config resolver (bench/core/architectures.py)."""
from pathlib import Path

from bench.core import architectures  # noqa: F401

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"   # the config tree every job is composed from
