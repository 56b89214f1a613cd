"""`python -m bench [--rerun] [-m] [overrides]`: compose a run (or a multirun) with Hydra and execute each job.

Flags and overrides may come in any order (`method=lora,adapter -m train.max_steps=50`); an unknown flag stops the
command with one line and exit code 2.

Before any job starts, every job of the command line is composed and validated (bench.config.check_command):
bad input stops the command with one line per problem and exit code 2, and no MLflow run is created.
Each job then:
- closes runs of its experiment that dead processes left RUNNING (bench.resume.close_orphans),
- is skipped when a FINISHED run with the same run key exists (`--rerun` / `rerun=true` runs it anyway),
- runs in a fresh worker process (`train.isolate=true`, the default), so that peak-memory figures and crashes
  stay with their own run. SIGINT/SIGTERM are forwarded to the worker, which ends its run KILLED; the multirun
  then stops (exit 130 / 143). A worker that dies (e.g. killed for lack of memory) fails its run only.
The summary table is printed by bench.summary at the end.
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import hydra
from omegaconf import OmegaConf

from bench import faults
from bench.errors import BenchError

PREFLIGHT_ENV = "BENCH_PREFLIGHT_DONE"  # set by main() once every job passed validation (joblib workers inherit it)
HYDRA_FLAGS_WITHOUT_JOBS = ("--cfg", "--help", "--hydra-help", "--info", "--shell-completion", "--resolve", "--package")
# the pre-check composes conf/config.yaml; with another config (or Hydra's rerun of a saved one) it checks nothing and
# each job is validated when it starts
HYDRA_FLAGS_OTHER_CONFIG = ("--config-path", "--config-name", "--config-dir", "--experimental-rerun")
USAGE = "usage: python -m bench [--rerun] [-m] [key=value ...] (--hydra-help lists Hydra's flags)"


def _parallel_workers() -> int | None:
    """Number of jobs the joblib launcher runs at once, or None under another launcher."""
    from hydra.core.hydra_config import HydraConfig
    if not HydraConfig.initialized():
        return None
    launcher = HydraConfig.get().launcher
    if "joblib" not in str(launcher.get("_target_", "")):
        return None
    n, cores = launcher.get("n_jobs") or -1, _cores()
    return max(1, n if n > 0 else cores + 1 + n)  # joblib: -1 = all cores, -2 = all but one, ...


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _limit_threads(cfg) -> None:
    """Parallel workers share the cores: workers x torch threads <= cores, unless train.threads is set."""
    workers = _parallel_workers()
    if workers and cfg.train.threads is None:
        cfg.train.threads = max(1, _cores() // workers)


def _skip_if_finished(cfg, tracker, out_dir: Path):
    from bench import resume
    from bench.run import Result
    from bench.track import run_name
    done = resume.find_finished(tracker, resume.run_key(cfg))
    if done is None:
        return None
    print(f"skip {run_name(cfg)}: finished earlier (run {done.info.run_id})", flush=True)
    result = Result(name=run_name(cfg), status="FINISHED", run_id=done.info.run_id, metrics=dict(done.data.metrics),
                    tags={k: v for k, v in done.data.tags.items() if not k.startswith("mlflow.")}, skipped=True)
    result.write(out_dir)
    return result


def execute(cfg, out_dir: Path):
    """Run one composed job; never raises for a failed run (its result.json and MLflow status say FAILED).
    Raises faults.Interrupted when SIGINT/SIGTERM stopped it (the run is KILLED; the multirun should stop)."""
    from bench import resume
    from bench.config import validate
    from bench.fmt import error_line
    from bench.run import Result
    from bench.track import Tracker, run_name

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "result.json").unlink(missing_ok=True)  # a job folder used again must not report an old result
    _limit_threads(cfg)
    try:
        if os.environ.get(PREFLIGHT_ENV) != "1":  # main() validated every job of this command already
            validate(cfg)  # bad input: one line, no MLflow run left behind
        OmegaConf.resolve(cfg)
        tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        result = Result(name=run_name(cfg), status="FAILED", error=str(e))
        result.write(out_dir)
        return result
    resume.close_orphans(tracker)
    if not cfg.get("rerun", False):
        skipped = _skip_if_finished(cfg, tracker, out_dir)
        if skipped is not None:
            return skipped

    if not cfg.train.isolate:
        from bench.run import run
        faults.raise_on_signals()  # SIGTERM ends this in-process run KILLED, like Ctrl-C
        try:
            return run(cfg, out_dir, tracker=tracker)
        except Exception as e:
            result = Result.read(out_dir)
            print(f"error: {result.error if result else error_line(e)}", file=sys.stderr)
            return result

    run_id = tracker.start(cfg)
    config_path = out_dir / "config.yaml"
    config_path.write_text(OmegaConf.to_yaml(cfg))
    env = {**os.environ, "BENCH_PARENT_PID": str(os.getpid())}
    if cfg.train.threads:
        env["OMP_NUM_THREADS"] = str(cfg.train.threads)  # also caps the BLAS/OpenMP pools of the worker
    from bench.quant_backend import HIDE_ENV
    env.pop(HIDE_ENV, None)
    if cfg.quant.name == "none":
        env[HIDE_ENV] = "1"  # bench/quant_backend.py: this worker never imports bitsandbytes
    proc = subprocess.Popen([sys.executable, "-m", "bench.run", "--config", str(config_path), "--run-id", run_id,
                             "--out-dir", str(out_dir)], env=env)
    with faults.forwarding_signals(proc) as caught:
        returncode = faults.wait_worker(proc, caught)
    signum = caught.get("signum") or faults.interrupted_exit(returncode)
    result = Result.read(out_dir)
    if result is None or result.status == "RUNNING":  # the worker died without writing its result
        status, reason = ("KILLED" if signum else "FAILED"), faults.describe_exit(returncode)
        tracker.end(run_id, status, reason)
        result = Result(name=run_name(cfg), status=status, run_id=run_id, error=reason)
        result.write(out_dir)
    if signum:
        raise faults.Interrupted(signum)  # the user stopped it: stop the multirun too
    return result


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def _hydra_main(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    execute(cfg, Path(HydraConfig.get().runtime.output_dir))


def hydra_argv(argv: list[str]) -> list[str]:
    """The command line as Hydra's parser takes it: every override, then every flag (argparse reads the overrides
    as one run, so `a=1 -m b=2` would leave b=2 unrecognized). `--rerun` becomes the override rerun=true.
    An unknown flag or a flag without its value: one line on stderr, exit code 2."""
    parser = _hydra_parser()
    parser.add_argument("--rerun", action="store_true")  # a flag for users; Hydra itself only takes overrides
    parser.error = _usage_error
    args = parser.parse_intermixed_args(argv)
    overrides = list(args.overrides)
    if args.rerun and not any(a.startswith("rerun=") for a in overrides):
        overrides.append("rerun=true")
    flags = []
    for action in parser._actions:
        value = getattr(args, action.dest, action.default)  # --version: not in args (it exits)
        if action.option_strings and action.dest != "rerun" and value != action.default:
            flags += [action.option_strings[0]] + ([] if action.nargs == 0 else [value])
    return [*overrides, *flags]


def _hydra_parser():
    """Hydra's own argument parser, so its flags stay the ones Hydra documents. A private Hydra API: hydra-core is
    pinned to the tested minor range in pyproject.toml, and tests/test_reliability.py fails clearly if it moves."""
    try:
        from hydra._internal.utils import get_args_parser
    except ImportError as e:
        raise SystemExit(f"error: hydra-core {hydra.__version__} no longer has hydra._internal.utils.get_args_parser, "
                         "which python -m bench reads Hydra's flags from; pip install 'hydra-core>=1.3,<1.4'") from e
    return get_args_parser()


def _usage_error(message: str) -> NoReturn:
    """argparse's error in one line (argparse would print its whole usage first)."""
    print(f"error: {message}; {USAGE}", file=sys.stderr)
    raise SystemExit(2)


def _preflight(argv: list[str]) -> int:
    """Validate every job of the command line (as hydra_argv orders it) before Hydra starts any; 2 (usage error)
    on bad input."""
    from bench.config import check_command
    os.environ.pop(PREFLIGHT_ENV, None)
    overrides = list(itertools.takewhile(lambda a: not a.startswith("-"), argv))
    flags = argv[len(overrides):]
    if any(f in HYDRA_FLAGS_WITHOUT_JOBS + HYDRA_FLAGS_OTHER_CONFIG for f in flags):
        return 0
    errors, checked = check_command(overrides, "--multirun" in flags, with_status=True)
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    if checked and not errors:
        os.environ[PREFLIGHT_ENV] = "1"
    return 2 if errors else 0


def main(argv: list[str] | None = None) -> None:
    """`python -m bench`: argv defaults to the command line's arguments."""
    argv = hydra_argv(sys.argv[1:] if argv is None else argv)
    sys.argv = [sys.argv[0], *argv]
    faults.raise_on_signals(stop_workers=True)
    try:
        code = _preflight(argv)
        if code:
            raise SystemExit(code)
        _hydra_main()
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", 2)
        print(f"stopped by {'SIGTERM' if signum == 15 else 'SIGINT'}: runs in progress were ended KILLED; "
              "run the same command again to resume (finished runs are skipped)", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum) from None


if __name__ == "__main__":
    main()
