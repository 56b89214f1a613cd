"""`python -m bench [overrides] [-m]`: compose a run (or a multirun) with Hydra and execute each job.

Each job runs in a fresh worker process (`train.isolate=true`, the default) so that peak-memory figures and
crashes stay with their own run; the summary table is printed by bench.summary at the end.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from bench.errors import BenchError
from bench.run import Result, error_line, run
from bench.track import Tracker, run_name


def execute(cfg, out_dir: Path) -> Result:
    """Run one composed job; never raises for a failed run (its result.json and MLflow status say FAILED)."""
    from bench.config import validate
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        validate(cfg)  # bad input: one line, no MLflow run left behind
        OmegaConf.resolve(cfg)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        result = Result(name=run_name(cfg), status="FAILED", error=str(e))
        result.write(out_dir)
        return result
    if not cfg.train.isolate:
        try:
            return run(cfg, out_dir)
        except Exception as e:
            print(f"error: {error_line(e)}", file=sys.stderr)
            return Result.read(out_dir)

    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    run_id = tracker.start(cfg)
    config_path = out_dir / "config.yaml"
    config_path.write_text(OmegaConf.to_yaml(cfg))
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--config", str(config_path), "--run-id", run_id,
                           "--out-dir", str(out_dir)])
    result = Result.read(out_dir)
    if result is None or result.status == "RUNNING":  # the worker died without writing its result
        reason = f"worker process exited with code {proc.returncode} before finishing"
        tracker.end(run_id, "FAILED", reason)
        result = Result(name=run_name(cfg), status="FAILED", run_id=run_id, error=reason)
        result.write(out_dir)
    if proc.returncode == 130 or proc.returncode < 0 and proc.returncode in (-2, -15):
        raise KeyboardInterrupt  # the user interrupted: stop the multirun too
    return result


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def _hydra_main(cfg) -> None:
    execute(cfg, Path(HydraConfig.get().runtime.output_dir))


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
