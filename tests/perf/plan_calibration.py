"""The README's activation-estimate table (*Planning*, "Checked against measurement"): MiniLM-L6 and SmolLM2-135M at
two batch sizes each, under every calibrated method (lora, prompt, ia3, full), 3 training steps of a fixed padded
b x 128 batch, each run in its own worker; prints estimate, measured and error per run, then the worst error.
About 10 minutes on 2 idle CPU cores (the test suite runs the lora and full half of it).

    python tests/perf/plan_calibration.py
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.test_plan import CALIBRATED_METHODS, calibrate  # noqa: E402


def main() -> None:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        errors = calibrate(Path(folder), CALIBRATED_METHODS)
    worst = max(abs(est / meas - 1) for est, meas in errors.values())
    within = sum(abs(est / meas - 1) <= 0.20 for est, meas in errors.values())
    print(f"worst error {100 * worst:.0f} %; within 20 %: {within} of {len(errors)}; "
          f"{time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
