"""The default generative job against its 10-minute budget on this machine: runs it (a fresh MLflow store in a
temporary folder, isolated worker as usual) and prints its wall-clock, its phases, its training throughput and its
scores, with the load average before and after. Run it on an idle machine; extra arguments are overrides.

    python tests/perf/generation_budget.py                      # model=smollm2 task=trec_instruct method=lora
    python tests/perf/generation_budget.py method=ia3 --repeat 2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT = ["model=smollm2", "task=trec_instruct", "method=lora"]
SHOWN = ("time/total_s", "time/train_s", "time/eval_s", "train/steps", "train/tokens",
         "throughput/train_tokens_per_s", "throughput/train_samples_per_s", "mem/peak_train_bytes",
         "test/accuracy", "test/invalid_rate", "test/chrf", "test/bleu", "forget/loss_delta")
BUDGET_S = 600


def run_once(overrides: list[str]) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as d:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "bench", *overrides, f"tracking.uri=sqlite:///{d}/mlflow.db",
                        f"hydra.run.dir={d}/out", "--rerun"], check=True, cwd=d, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        result = json.loads(next(Path(d, "out").rglob("result.json")).read_text())
    return wall, result["metrics"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1)
    args, overrides = parser.parse_known_args()
    overrides = [*DEFAULT, *overrides]
    print("job:", " ".join(overrides))
    for i in range(args.repeat):
        load = os.getloadavg()[0]
        wall, metrics = run_once(overrides)
        print(f"run {i + 1}: command wall-clock {wall:.0f} s (budget {BUDGET_S} s), load average "
              f"{load:.2f} before, {os.getloadavg()[0]:.2f} after")
        for key in SHOWN:
            if key in metrics:
                print(f"  {key:34s} {metrics[key]:.4g}")


if __name__ == "__main__":
    main()
