"""`python -m bench [--rerun] [-m] [overrides]` (or `bench ...`): the command line.

Flags and overrides may come in any order (`method=lora,adapter -m train.max_steps=50`); an unknown flag stops the
command with one line and exit code 2. Before any job starts, every job of the command line is composed and
validated once (bench/orchestration/validate.py: check_command): bad input stops the command with one line per
problem and exit code 2, and no MLflow run is created. Hydra then composes each job from conf/ and calls
bench/orchestration/job.py: execute. The summary table is printed by bench/orchestration/summary.py at the end.
"""
from __future__ import annotations

import itertools
import signal
import sys
from pathlib import Path
from typing import NoReturn

import hydra

from bench import CONF_DIR
from bench.orchestration import faults

HYDRA_FLAGS_WITHOUT_JOBS = ("--cfg", "--help", "--hydra-help", "--info", "--shell-completion", "--resolve", "--package")
# the pre-check composes conf/config.yaml; with another config (or Hydra's rerun of a saved one) it checks nothing and
# each job is validated when it starts
HYDRA_FLAGS_OTHER_CONFIG = ("--config-path", "--config-name", "--config-dir", "--experimental-rerun")
USAGE = ("usage: python -m bench [--rerun] [-m] [key=value ...] (--hydra-help lists Hydra's flags); "
         "bench [run|sweep|compare|report|assets|multitask|plan] ...")


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")  # absolute: works for `bench`, too
def _hydra_main(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from bench.orchestration.job import execute
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
    from bench.orchestration.validate import check_command
    overrides = list(itertools.takewhile(lambda a: not a.startswith("-"), argv))
    flags = argv[len(overrides):]
    if any(f in HYDRA_FLAGS_WITHOUT_JOBS + HYDRA_FLAGS_OTHER_CONFIG for f in flags):
        return 0
    errors = check_command(overrides, "--multirun" in flags)
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    return 2 if errors else 0


SUBCOMMANDS = {  # `bench <name> ...` = `python -m <module> ...`; `bench run ...` and plain `bench ...` = `python -m bench`
    "sweep": "bench.sweep.cli", "report": "bench.report", "assets": "bench.assets",
    "multitask": "bench.orchestration.multitask", "compare": "bench.sweep.compare",
    "plan": "bench.plan"}


def _subcommand(argv: list[str]) -> None:
    """`bench sweep|compare|report|assets|multitask|plan ...`: hand the rest of the line to that command's main; exit
    with its code."""
    import importlib
    module = importlib.import_module(SUBCOMMANDS[argv[0]])
    sys.argv = [f"bench {argv[0]}", *argv[1:]]
    raise SystemExit(module.main(argv[1:]))


def _other_launcher(argv: list[str]) -> bool:
    """Jobs run in a launcher's own processes (joblib; submitit's jobs, Ray's tasks), each of which starts its own
    template when it needs one."""
    return any(a.lstrip("+").startswith("hydra/launcher=") for a in argv)


def main(argv: list[str] | None = None) -> None:
    """`python -m bench` / `bench`: argv defaults to the command line's arguments."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        _subcommand(argv)
    if argv and argv[0] == "run":
        argv = argv[1:]
    argv = hydra_argv(argv)
    sys.argv = [sys.argv[0], *argv]
    faults.raise_on_signals(stop_workers=True)
    try:
        if not any(f in HYDRA_FLAGS_WITHOUT_JOBS for f in argv) and not _other_launcher(argv):
            from bench.orchestration import launch
            launch.warm_up()  # the workers' template imports while the pre-check runs
        code = _preflight(argv)
        if code:
            raise SystemExit(code)
        _hydra_main()
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", 2)
        print(f"stopped by {signal.Signals(signum).name}: runs in progress were ended KILLED; "
              "run the same command again to resume (finished runs are skipped)", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum) from None


_EXIT = {"code": 0}


def cli() -> None:
    """The program (`python -m bench`, the `bench` script): main(), then an exit that skips tearing down torch,
    transformers and peft module by module (about 2 s on 2 cores) once every exit handler has run."""
    import atexit
    atexit.register(_exit_now)   # registered before the handlers of anything main() imports, so it runs last
    try:
        main()
    except SystemExit as e:
        _EXIT["code"] = e.code
        raise


def _exit_now() -> None:
    import logging
    import os
    code = _EXIT["code"]
    if isinstance(code, str):   # sys.exit("message") printed it already; its exit status is 1
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    cli()
