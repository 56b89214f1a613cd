"""`python -m bench.multitask task=A,B[,C] [method=lora] [overrides ...] [--rerun] [--out-dir DIR]` (or
`bench multitask ...`): one adapter per task on one backbone, then all of them on one base (bench/core/multitask.py).

1. The command line: 2 or more distinct tasks of one kind (classification, or generation), one value for every
   other key, a peft method, quant=none; then each task's job is validated as `python -m bench` validates it
   (validate.check_command). Bad input: one line per problem, exit code 2, no MLflow run.
2. A parent MLflow run `multitask-<method>-<model>-s<seed>` (tags multitask=parent, multitask_key: a hash of the
   task jobs' run keys). The same command again finds it by that key: FINISHED is skipped, anything else resumed;
   --rerun starts a new one.
3. One normal run per task, exactly as `python -m bench task=<task>` runs it (job.run_in_worker: a fresh worker
   process; in this process with train.isolate=false), nested under the parent (tag mlflow.parentRunId), its
   checkpoint in <out-dir>/<parent run id>/<task>/ckpt (tag ckpt_dir). A resumed parent reuses a FINISHED task run
   whose checkpoint is still there, and runs the task again when it is gone.
4. The measurement (bench/core/multitask.py: measure) in a fresh process forked from the warm template, like a job's
   worker (in this process with train.isolate=false); its figures go to the parent run (metrics, tag mixed_batch,
   artifact multitask.json), each task's switched test score to the task's run. Exit code 0, 1 when a run or the
   measurement failed (the parent run FAILED with the reason), 130 / 143 when interrupted (KILLED).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from mlflow.entities import Param
from omegaconf import OmegaConf

from bench import CONF_DIR
from bench.core import metrics as M
from bench.errors import BenchError
from bench.files import atomic_path
from bench.fmt import error_line, human_bytes
from bench.orchestration import faults, heartbeat, launch, resume
from bench.orchestration.job import run_in_worker
from bench.orchestration.result import Result
from bench.tracking import Tracker, run_name

OWN = {M.MULTITASK_TEST_ACCURACY_SWITCHED: M.TEST_ACCURACY, M.MULTITASK_TEST_CHRF_SWITCHED: M.TEST_CHRF}
class Stopped(Exception):
    """A task run or the measurement did not finish: the message is the line the parent run's error tag gets."""


USAGE = "usage: python -m bench.multitask task=A,B[,C] [method=lora] [key=value ...] [--rerun] [--out-dir DIR]"


def parse_args(argv: list[str]):
    p = argparse.ArgumentParser(prog="python -m bench.multitask", description="One adapter per task on one "
                                "backbone, then all of them on one base: switching, cross-talk, load time, memory.")
    p.add_argument("overrides", nargs="*", help="Hydra overrides: task=A,B[,C] and any run setting (method=lora, ...)")
    p.add_argument("--rerun", action="store_true", help="train every task again under a new parent run")
    p.add_argument("--out-dir", default="outputs/multitask",
                   help="task run folders go to OUT_DIR/<parent run id>/<task>")
    p.error = _usage_error
    return p.parse_intermixed_args(argv)


def _usage_error(message: str):
    print(f"error: {message}; {USAGE}", file=sys.stderr)
    raise SystemExit(2)


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


def split_tasks(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(the tasks of task=A,B[,C], the other overrides); BenchError for fewer than 2 tasks, a task named twice, or
    another key given several values (one multitask command compares tasks, nothing else)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise BenchError(error_line(e, with_type=False)) from None
    names, rest = [], []
    for o, text in zip(parsed, overrides):
        key = o.get_key_element()
        if key.lstrip("+~") == "task":
            names = list(o.sweep_string_iterator()) if o.is_discrete_sweep() else [o.get_value_element_as_str()]
        elif o.is_sweep_override():
            raise BenchError(f"{key}: one value per multitask command, got {text.split('=', 1)[1]}; "
                             f"valid: task=A,B[,C] is the only list (run one command per {key})")
        else:
            rest.append(text)
    if len(names) < 2:
        raise BenchError(f"task: multitask needs at least 2 tasks, as task=A,B[,C]; "
                         f"valid: {', '.join(choices('task'))}")
    twice = sorted({t for t in names if names.count(t) > 1})
    if twice:
        raise BenchError(f"task: {', '.join(twice)} named twice; valid: each task once, as task=A,B[,C]")
    return names, rest


def peft_methods() -> list[str]:
    import yaml
    return [m for m in choices("method")
            if (yaml.safe_load((CONF_DIR / "method" / f"{m}.yaml").read_text()) or {}).get("kind") == "peft"]


def check_jobs(cfgs) -> None:
    """What only multitask asks of its jobs: a peft method (its adapters load side by side onto one base), a base
    in float32, and tasks of one kind (one base is either a classifier or a language model)."""
    cfg = cfgs[0]
    if cfg.method.kind != "peft":
        raise BenchError(f"method: multitask loads several adapters of one peft method onto one base; "
                         f"method={cfg.method.name} is kind {cfg.method.kind}; valid: {', '.join(peft_methods())}")
    if cfg.quant.name != "none":
        raise BenchError(f"quant: multitask compares its base with full float32 models; quant={cfg.quant.name} is "
                         "not supported; valid: none")
    kinds = {str(c.task.name): str(c.task.get("kind", "classification")) for c in cfgs}
    if len(set(kinds.values())) > 1:
        listed = ", ".join(f"{task} ({kind})" for task, kind in kinds.items())
        raise BenchError(f"task: {listed}: one base model is a classifier or a language model, not both; "
                         "valid: tasks of one kind")


def compose_jobs(names: list[str], rest: list[str]) -> list:
    """Each task's job, composed from conf/ as `python -m bench` composes it (HydraException when it does not)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3", job_name="bench"):
            return [compose("config", overrides=[*rest, f"task={t}"]) for t in names]
    finally:
        GlobalHydra.instance().clear()


def checked(overrides: list[str]) -> tuple[list, list[str]]:
    """(each task's resolved job config, []) or ([], the error lines): multitask's own checks first (cheap), then
    every job validated as python -m bench validates it."""
    from hydra.errors import HydraException

    from bench.orchestration.validate import check_command
    try:
        names, rest = split_tasks(overrides)
    except BenchError as e:
        return [], [str(e)]
    try:
        cfgs = compose_jobs(names, rest)
    except HydraException:
        cfgs = None   # check_command says what does not compose, in its one line
    if cfgs:
        try:
            check_jobs(cfgs)
        except BenchError as e:
            return [], [str(e)]
    errors = check_command([*rest, f"task={','.join(names)}"], multirun=True)
    if errors:
        return [], errors
    cfgs = cfgs or compose_jobs(names, rest)
    for cfg in cfgs:
        OmegaConf.resolve(cfg)
    return cfgs, []


# --- MLflow: the parent run and the task runs -------------------------------------------------------------

def multitask_key(cfgs) -> str:
    return hashlib.sha256(",".join(resume.run_key(c) for c in cfgs).encode()).hexdigest()[:16]


def parent_name(cfg) -> str:
    return f"multitask-{cfg.method.name}-{cfg.model.name}-s{cfg.seed}"


def open_parent(tracker, cfgs, key: str, rerun: bool):
    """(the parent run's id, whether it FINISHED earlier): the newest parent with this key (reopened RUNNING unless
    FINISHED), else a new one; --rerun: always a new one."""
    found = [] if rerun else tracker.client.search_runs(
        [tracker.experiment_id], f"tags.multitask = 'parent' and tags.multitask_key = '{key}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    holder = resume.process_tags("owner")
    if found:
        run = found[0]
        if run.info.status == "FINISHED":
            return run.info.run_id, True
        if run.info.status == "RUNNING" and resume.holder_alive(run.data.tags):
            raise Stopped(f"{parent_name(cfgs[0])}: another command (pid {run.data.tags.get('owner.pid')}) runs it "
                          f"now (run {run.info.run_id}); wait for it, or pass --rerun for a new one")
        if "error" in run.data.tags:   # the reason it stopped last time
            tracker.client.delete_tag(run.info.run_id, "error")
        tracker.client.update_run(run.info.run_id, status="RUNNING")
        tracker.set_tags(run.info.run_id, {"status": "RUNNING", **holder})
        return run.info.run_id, False
    cfg = cfgs[0]
    tasks = ",".join(str(c.task.name) for c in cfgs)
    run = tracker.client.create_run(tracker.experiment_id, run_name=parent_name(cfg), tags={
        "multitask": "parent", "multitask_key": key, "method": cfg.method.name, "model": cfg.model.name,
        "quant": cfg.quant.name, "seed": str(cfg.seed), "tasks": tasks, "status": "RUNNING", **holder})
    tracker.client.log_batch(run.info.run_id, params=[Param("tasks", tasks), Param("method", cfg.method.name),
                                                      Param("model", cfg.model.name), Param("seed", str(cfg.seed))])
    return run.info.run_id, False


def finished_task_run(tracker, parent_id: str, cfg):
    """The newest FINISHED run of this job under the parent, or None."""
    found = tracker.client.search_runs(
        [tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.run_key = "
                                 f"'{resume.run_key(cfg)}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return found[0] if found else None


def run_task(cfg, tracker, parent_id: str, key: str, out_dir: Path) -> Result:
    """The task's run under the parent, as `python -m bench` runs a job; a FINISHED one whose checkpoint is still
    there is reused (skipped)."""
    name, ckpt = run_name(cfg), (out_dir / "ckpt").absolute()
    done = finished_task_run(tracker, parent_id, cfg)
    if done is not None:
        saved = Path(done.data.tags.get("ckpt_dir", ""))
        if (saved / "adapter_config.json").is_file():
            print(f"skip {name}: finished earlier (run {done.info.run_id}), checkpoint {saved}", flush=True)
            return Result(name, "FINISHED", done.info.run_id, dict(done.data.metrics),
                          {"ckpt_dir": str(saved)}, skipped=True)
        print(f"run {name} again: the checkpoint of its finished run {done.info.run_id} is gone ({saved})", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "result.json").unlink(missing_ok=True)
    run_id = tracker.start(cfg, extra_tags={"mlflow.parentRunId": parent_id, "multitask": "child",
                                            "multitask_key": key, "ckpt_dir": str(ckpt)})
    if not cfg.train.isolate:
        from bench.orchestration.worker import run_job   # the worker's stack, only for in-process runs
        try:
            result = run_job(cfg, out_dir, run_id=run_id, tracker=tracker)
        except Exception as e:
            result = Result.read(out_dir) or Result(name, "FAILED", run_id, error=error_line(e))
    else:
        result, signum = run_in_worker(cfg, out_dir, tracker, run_id)
        if signum:
            raise faults.Interrupted(signum)
    result.tags["ckpt_dir"] = str(ckpt)
    return result


# --- the measurement, in a fresh process ------------------------------------------------------------------

def measure(cfgs, ckpts: list[str], out_path: Path):
    """bench/core/multitask.py: measure on the tasks' checkpoints, in a child forked from the warm template
    (train.isolate=true) or in this process; its outcome is written to out_path and returned."""
    from bench.core.multitask import Outcome
    configs = [OmegaConf.to_yaml(c) for c in cfgs]
    out_path.unlink(missing_ok=True)
    if not cfgs[0].train.isolate:
        _measure(configs, ckpts, str(out_path))
    else:
        proc = launch.start_child(_measure_child, configs, ckpts, str(out_path), os.getpid())
        with faults.forwarding_signals(proc) as caught:
            code = faults.wait_worker(proc, caught)
        signum = caught.get("signum") or faults.interrupted_exit(code)
        if signum:
            raise faults.Interrupted(signum)
        if not out_path.is_file():
            raise Stopped(f"the measurement's {faults.describe_exit(code)}")
    outcome = json.loads(out_path.read_text())
    if "error" in outcome:
        raise Stopped(f"the measurement failed: {outcome['error']}")
    return Outcome(**outcome)


def _measure(configs: list[str], ckpts: list[str], out_path: str) -> None:
    import torch

    from bench.core import multitask, pipeline
    from bench.orchestration.worker import quiet_libraries
    quiet_libraries()
    cfgs = [OmegaConf.create(c) for c in configs]
    if cfgs[0].train.threads:
        torch.set_num_threads(int(cfgs[0].train.threads))
    adapters = [multitask.Adapter(cfg, Path(ckpt)) for cfg, ckpt in zip(cfgs, ckpts)]
    try:
        result = asdict(multitask.measure(adapters, pipeline.pick_device(cfgs[0].device)))
    except Exception as e:
        result = {"error": error_line(e)}
    with atomic_path(Path(out_path)) as tmp:
        tmp.write_text(json.dumps(result, indent=2, sort_keys=True))


def _measure_child(configs: list[str], ckpts: list[str], out_path: str, parent_pid: int) -> None:
    """In the forked child: die with the command, SIGTERM / SIGINT end it (the parent run is then KILLED)."""
    os.environ["BENCH_PARENT_PID"] = str(parent_pid)
    faults.die_with_parent()
    faults.raise_on_signals()
    try:
        _measure(configs, ckpts, out_path)
    except KeyboardInterrupt as e:
        raise SystemExit(getattr(e, "exit_code", 130)) from None


# --- the command ------------------------------------------------------------------------------------------

def log_outcome(tracker, parent_id: str, results: dict[str, Result], outcome) -> None:
    tracker.log_metrics(parent_id, outcome.metrics)
    tracker.set_tags(parent_id, outcome.tags)
    tracker.log_json(parent_id, asdict(outcome), "multitask.json")
    for task, result in results.items():
        tracker.log_metrics(result.run_id, outcome.per_task[task])
        tracker.set_tags(result.run_id, outcome.task_tags[task])


def print_outcome(name: str, parent_id: str, results: dict[str, Result], outcome) -> None:
    m = outcome.metrics
    print(f"{name} (run {parent_id}): {int(m[M.MULTITASK_TASKS])} adapters on one base")
    for task, result in results.items():
        (metric, switched), = outcome.per_task[task].items()
        own = result.metrics.get(OWN[metric])
        tags = outcome.task_tags[task]
        same = "identical" if tags["multitask.predictions_equal"] == "true" else "DIFFERENT"
        print(f"  {task}: switched {switched:.4f} (its own run {own if own is None else f'{own:.4f}'}), "
              f"predictions {same} to the adapter alone, max |logit diff| {tags['multitask.max_abs_logit_diff']}")
    print(f"  switch {m[M.MULTITASK_SWITCH_MS]:.3f} ms (IQR {m[M.MULTITASK_SWITCH_IQR_MS]:.3f}), load "
          f"{m[M.MULTITASK_LOAD_S]:.3f} s per adapter; stored: base {human_bytes(m[M.MULTITASK_BASE_BYTES])} + "
          f"adapters {human_bytes(m[M.MULTITASK_ADAPTERS_BYTES])} against "
          f"{human_bytes(m[M.MULTITASK_FULL_MODELS_BYTES])} for full models; memory growth: base "
          f"{human_bytes(m[M.MULTITASK_RSS_BASE_BYTES])}, adapters {human_bytes(m[M.MULTITASK_RSS_ADAPTERS_BYTES])}")
    mixed = m.get(M.MULTITASK_MIXED_BATCH_MAX_ABS_DIFF)
    print(f"  mixed batch: {outcome.tags['mixed_batch']}" + ("" if mixed is None else f" (max |diff| {mixed:g})"))


def run_command(cfgs, a) -> int:
    """The parent run, each task's run, the measurement, the record (exit code 0, or 1 with the reason)."""
    tracker = Tracker(cfgs[0].tracking.uri, cfgs[0].tracking.experiment)
    resume.close_orphans(tracker)
    key = multitask_key(cfgs)
    try:
        parent_id, finished = open_parent(tracker, cfgs, key, a.rerun or bool(cfgs[0].get("rerun", False)))
    except Stopped as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if finished:
        print(f"skip {parent_name(cfgs[0])}: finished earlier (run {parent_id}); --rerun runs it all again")
        return 0
    try:
        folder = Path(a.out_dir) / parent_id
        with heartbeat.beating(tracker, parent_id):   # other hosts see the parent run alive
            results = {str(c.task.name): run_task(c, tracker, parent_id, key, folder / str(c.task.name))
                       for c in cfgs}
            failed = [f"{r.name}: {r.error or r.status}" for r in results.values() if r.status != "FINISHED"]
            if failed:
                raise Stopped(f"{len(failed)} task run(s) did not finish ({'; '.join(failed)}); run the same "
                              "command again to resume")
            outcome = measure(cfgs, [r.tags["ckpt_dir"] for r in results.values()], folder / "multitask.json")
            log_outcome(tracker, parent_id, results, outcome)
    except KeyboardInterrupt as e:
        tracker.end(parent_id, "KILLED", f"Interrupted: {e}")
        print("stopped: the multitask run was ended KILLED; run the same command again to resume", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    except Exception as e:
        reason = str(e) if isinstance(e, Stopped) else error_line(e)
        tracker.end(parent_id, "FAILED", reason)
        print(f"error: {reason}", file=sys.stderr)
        return 1
    tracker.end(parent_id, "FINISHED")
    print_outcome(parent_name(cfgs[0]), parent_id, results, outcome)
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    if "train.isolate=false" not in a.overrides:
        launch.warm_up()   # the workers' template imports while the command is checked
    faults.raise_on_signals(stop_workers=True)
    try:
        cfgs, errors = checked(a.overrides)
        for line in errors:
            print(f"error: {line}", file=sys.stderr)
        return 2 if errors else run_command(cfgs, a)
    except KeyboardInterrupt as e:
        return getattr(e, "exit_code", 130)
