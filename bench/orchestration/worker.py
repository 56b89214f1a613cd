"""The worker: one job's run with its MLflow record, in the process that measures it.

`python -m bench.orchestration.worker --config C --run-id R --out-dir D` runs one job in a fresh process (the
parent, bench/orchestration/job.py, starts one per job so that no run's memory figures depend on the runs before
it). `run_job` wraps bench/core/pipeline.py's `run` between the MLflow run's start and its end (FINISHED, FAILED
with the reason, or KILLED), and writes result.json for the parent. The config arrives validated by the parent.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import OmegaConf

from bench.core import metrics as M
from bench.core import pipeline
from bench.core.quant_backend import HIDE_ENV
from bench.errors import BenchError
from bench.fmt import error_line
from bench.orchestration import heartbeat
from bench.orchestration.faults import die_with_parent, is_out_of_memory, raise_on_signals
from bench.orchestration.result import Result
from bench.tracking import Tracker, provenance, run_name


def run_job(cfg, out_dir: Path, *, run_id: str | None = None, tracker: Tracker | None = None,
            on_eval=None) -> Result:
    """One job's run with its MLflow record: bench.core.pipeline.run between the run's start and end.
    A run that raises is ended FAILED (KILLED on interrupt) and re-raised. The config arrives validated."""
    out_dir = Path(out_dir)
    quiet_libraries()
    tracker = tracker or Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    # a run opened here (train.isolate=false) beats here; a worker's run beats in the parent that waits for it
    beat = contextlib.nullcontext() if run_id else None
    run_id = run_id or tracker.start(cfg)
    beat = beat or heartbeat.beating(tracker, run_id)
    result = Result(name=run_name(cfg), status="RUNNING", run_id=run_id)
    with beat:
        return _run(cfg, out_dir, run_id, tracker, on_eval, result)


def _run(cfg, out_dir: Path, run_id: str, tracker: Tracker, on_eval, result: Result) -> Result:
    try:
        tracker.log_config(run_id, cfg)
        if cfg.train.threads:
            torch.set_num_threads(int(cfg.train.threads))   # before provenance, which records it
        device = pipeline.pick_device(cfg.device)
        tracker.set_tags(run_id, provenance(device))
        outcome = pipeline.run(cfg, out_dir, device, tracker.bind(run_id), on_eval=on_eval)
        tracker.log_file(run_id, outcome.predictions, M.PREDICTIONS_ARTIFACT)
        result.metrics, result.tags = outcome.metrics, outcome.tags
        logged = set(M.HISTORY)  # already in the store with their step history (train.fit)
        tracker.log_metrics(run_id, {k: v for k, v in result.metrics.items() if k not in logged},
                            step=int(result.metrics[M.TRAIN_STEPS]))
        tracker.set_tags(run_id, result.tags)
        result.status = "FINISHED"
        tracker.log_json(run_id, asdict(result), "result.json")
        result.write(out_dir)
        tracker.end(run_id, "FINISHED")
        return result
    except BaseException as e:
        # an exception may name its own outcome (e.g. a sweep's pruned trial: KILLED + the step it stopped at)
        result.status = "KILLED" if isinstance(e, KeyboardInterrupt) else getattr(e, "mlflow_status", "FAILED")
        result.error = error_line(e)
        if is_out_of_memory(e):
            result.error = f"out of memory: {result.error}"
        result.tags.update(getattr(e, "mlflow_tags", {}))
        result.write(out_dir)
        try:
            tracker.set_tags(run_id, result.tags)
            tracker.end(run_id, result.status, result.error)
        except Exception:  # the store itself may be what failed; the result file still says why
            pass
        raise


def quiet_libraries() -> None:
    """Keep the console to the harness's own lines and the training progress bar."""
    import warnings

    import datasets
    import transformers
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()  # e.g. the load report listing the new head's weights
    transformers.logging.disable_progress_bar()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Run one job from a resolved config (used by `python -m bench`).")
    p.add_argument("--config", required=True, help="resolved config YAML")
    p.add_argument("--run-id", required=True, help="MLflow run opened by the parent process")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--on-eval", default=None, help="MODULE:FUNCTION(cfg, **ARGS) returning the trainer's on_eval "
                   "callback (a sweep's pruning hook)")
    p.add_argument("--on-eval-args", default="{}", help="ARGS for --on-eval, as JSON")
    a = p.parse_args(argv)
    die_with_parent()   # a SIGKILLed parent takes its worker along (which then ends its run KILLED)
    raise_on_signals()  # SIGTERM, like SIGINT, ends the run KILLED
    cfg = OmegaConf.load(a.config)
    try:
        from bench.orchestration.resume import process_tags
        tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
        tracker.set_tags(a.run_id, process_tags("worker"))  # this process holds the run now, too
        on_eval = _hook(a.on_eval, json.loads(a.on_eval_args), cfg) if a.on_eval else None
        run_job(cfg, Path(a.out_dir), run_id=a.run_id, tracker=tracker, on_eval=on_eval)
    except KeyboardInterrupt as e:
        return getattr(e, "exit_code", 130)
    except Exception as e:
        if getattr(e, "mlflow_status", None):  # an outcome the caller asked for (a pruned trial): in result.json
            return 0
        print(f"error: {error_line(e)}")
        if not isinstance(e, BenchError):
            traceback.print_exc()
        return 1
    return 0


def _hook(spec: str, args: dict, cfg):
    import importlib
    module, function = spec.split(":")
    return getattr(importlib.import_module(module), function)(cfg, **args)


def forked_main(argv: list[str], env: dict[str, str]) -> None:
    """The worker forked from the warm template (bench/orchestration/launch.py): the job's environment, then main."""
    os.environ.clear()
    os.environ.update(env)
    os.environ[HIDE_ENV] = "1"   # true in this process: the template never imported bitsandbytes
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    raise SystemExit(code)


if __name__ == "__main__":
    raise SystemExit(main())
