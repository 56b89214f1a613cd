"""One run, start to finish: the straight line that `python -m bench`, sweeps and tests all go through.

    validate -> task data -> backbone (+ quantization) -> method -> train (+ periodic validation) -> test once
    -> save -> MLflow

`python -m bench.run --config C --run-id R --out-dir D` runs one job in a fresh worker process (bench.__main__
starts one per job so that no run's memory figures depend on the runs before it).
"""
from __future__ import annotations

import argparse
import json
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

from bench import methods, models, tasks, train
from bench import metrics as M
from bench.config import validate
from bench.errors import BenchError
from bench.faults import die_with_parent, is_out_of_memory, raise_on_signals
from bench.files import atomic_path
from bench.fmt import error_line
from bench.measure import Meter, grad_bytes, weights_bytes
from bench.track import Tracker, provenance, run_name


@dataclass
class Result:
    """What a run produced; `metrics` keys are the exact MLflow metric names (README: Metrics)."""
    name: str
    status: str                                   # FINISHED | FAILED | KILLED
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    skipped: bool = False                         # not run again: a FINISHED run with the same run key existed

    def write(self, out_dir: Path) -> Path:
        """result.json, written atomically (temp file, then rename)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "result.json"
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))
        return path

    @classmethod
    def read(cls, out_dir: Path) -> "Result | None":
        path = Path(out_dir) / "result.json"
        return cls(**json.loads(path.read_text())) if path.exists() else None


def write_predictions(predictions, out_dir: Path) -> Path:
    """The test predictions (index, label, prediction) as out_dir/predictions/test.parquet, written atomically."""
    path = Path(out_dir) / M.PREDICTIONS_ARTIFACT
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        predictions.to_parquet(tmp, index=False)
    return path


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BenchError("device: cuda requested but no CUDA device is available; valid here: auto, cpu")
    return torch.device(name)


def run(cfg, out_dir: Path, *, run_id: str | None = None, tracker: Tracker | None = None,
        on_eval=None) -> Result:
    """Execute one run and log it; a run that raises is ended FAILED (KILLED on interrupt) and re-raised."""
    out_dir = Path(out_dir)
    validate(cfg)
    quiet_libraries()
    started = time.perf_counter()  # time/total_s: wall-clock from here (before data and model load) to saved ckpt
    tracker = tracker or Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    run_id = run_id or tracker.start(cfg)
    result = Result(name=run_name(cfg), status="RUNNING", run_id=run_id)
    try:
        tracker.log_config(run_id, cfg)
        if cfg.train.threads:
            torch.set_num_threads(int(cfg.train.threads))
        device = pick_device(cfg.device)
        tracker.set_tags(run_id, provenance(device))
        meter = Meter(device)
        seed = int(cfg.seed)

        data = tasks.load(cfg.task, seed)
        _seed(seed)  # the new head's init depends on the seed only, not on the method
        model, tokenizer = models.load(cfg.model, cfg.quant, data.num_labels, device)
        _seed(seed)  # set again right before the method is built, so the seed reaches adapter initialization
        model = methods.apply(model, cfg.method, cfg.model)
        train_ds, val_ds, test_ds = tasks.tokenize(data, tokenizer, cfg.train.max_length)
        trainable, total = methods.count_parameters(model)
        tracker.log_metrics(run_id, {M.PARAMS_TRAINABLE: trainable, M.PARAMS_TOTAL: total})

        metrics = train.fit(model, train_ds, val_ds, tokenizer, cfg.train, seed=seed, num_labels=data.num_labels,
                            device=device, meter=meter, on_eval=on_eval,
                            log=lambda points: tracker.log_points(run_id, points))
        # the one test evaluation: the final (train.select) weights on the test split, after all selection
        meter.start("eval")
        test, predictions = train.evaluate(model, test_ds, tokenizer, cfg.train.eval_batch_size, data.num_labels,
                                           device, split="test")
        meter.stop("eval")
        ckpt_bytes = methods.save(model, cfg.method, out_dir / "ckpt")
        metrics.update(test)
        metrics.update({
            M.PARAMS_TRAINABLE: trainable,                       # parameters with requires_grad during training
            M.PARAMS_TOTAL: total,                               # see methods.count_parameters
            M.PARAMS_TRAINABLE_PCT: 100.0 * trainable / total,
            M.CKPT_BYTES: ckpt_bytes,                            # see methods.save
            M.MEM_WEIGHTS: weights_bytes(model),                 # see bench/measure.py
            M.MEM_GRAD: grad_bytes(model),
            M.TIME_TRAIN: meter.seconds["train"],                # training steps only: no evaluation, no store I/O
            M.TIME_EVAL: meter.seconds["eval"],                  # all periodic evaluations + the test evaluation
            M.TIME_TOTAL: time.perf_counter() - started,
            M.MEM_PEAK_TRAIN: meter.peak_bytes["train"],         # see bench/measure.py
            M.MEM_PEAK_EVAL: meter.peak_bytes["eval"],
        })
        if device.type == "cuda":
            metrics[M.MEM_PEAK_TRAIN_RESERVED] = meter.peak_reserved_bytes["train"]
            metrics[M.MEM_PEAK_EVAL_RESERVED] = meter.peak_reserved_bytes["eval"]
        tracker.log_file(run_id, write_predictions(predictions, out_dir), M.PREDICTIONS_ARTIFACT)
        result.metrics = metrics
        result.tags = {"mem_source": "cuda_allocated" if device.type == "cuda"
                       else ("rss_phase_peak" if meter.rss_resettable else "rss_lifetime_peak")}
        logged = set(M.HISTORY)  # already in the store with their step history (train.fit)
        tracker.log_metrics(run_id, {k: v for k, v in metrics.items() if k not in logged},
                            step=int(metrics[M.TRAIN_STEPS]))
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


def _seed(seed: int) -> None:
    from transformers import set_seed
    set_seed(seed)  # python, numpy and torch (all devices)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Run one job from a resolved config (used by `python -m bench`).")
    p.add_argument("--config", required=True, help="resolved config YAML")
    p.add_argument("--run-id", required=True, help="MLflow run opened by the parent process")
    p.add_argument("--out-dir", required=True)
    a = p.parse_args(argv)
    die_with_parent()   # a SIGKILLed parent takes its worker along (which then ends its run KILLED)
    raise_on_signals()  # SIGTERM, like SIGINT, ends the run KILLED
    cfg = OmegaConf.load(a.config)
    try:
        from bench.resume import process_tags
        tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
        tracker.set_tags(a.run_id, process_tags("worker"))  # this process holds the run now, too
        run(cfg, Path(a.out_dir), run_id=a.run_id, tracker=tracker)
    except KeyboardInterrupt as e:
        return getattr(e, "exit_code", 130)
    except Exception as e:
        print(f"error: {error_line(e)}")
        if not isinstance(e, BenchError):
            traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
