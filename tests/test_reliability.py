"""Faults a multirun survives, resume, parallel workers on one SQLite store, security basics.

Plumbing on a tiny random-init BERT and a toy csv (the real MLflow store, real processes and signals).
Subprocess runs use the real path: `python -m bench ... -m` with one worker process per job (train.isolate=true).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from bench.orchestration import faults, resume
from bench.orchestration.job import execute
from bench.orchestration.result import Result
from bench.orchestration.summary import report
from bench.tracking import Tracker, flatten, without_secrets
from tests.conftest import ROOT, compose


# --- helpers ------------------------------------------------------------------------------------------------

@pytest.fixture
def cli(tiny_bert_dir, toy_csv, tmp_path):
    """`python -m bench` on the tiny model with one worker process per job; returns (argv, store uri)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = [sys.executable, "-m", "bench", "model=hf", f"model.name_or_path={tiny_bert_dir}", "task=local",
            f"task.path={toy_csv}", "train.eval_every=null", "train.log_every=5", "train.batch_size=16",
            "device=cpu", "train.isolate=true", f"tracking.uri={uri}", f"hydra.sweep.dir={tmp_path}/sweep"]
    return argv, uri


def runs(uri: str) -> list:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("peft-bench")
    return client.search_runs([exp.experiment_id], max_results=1000) if exp else []


def by_seed(uri: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in sorted(runs(uri), key=lambda r: r.info.start_time):
        out.setdefault(r.data.tags["seed"], []).append(r.info.status)
    return out


def wait_for(predicate, timeout: float = 180, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def worker_of(uri: str, seed: int, need_metric: str | None = None) -> int | None:
    """pid of the worker process filling the run of `seed`, once it has started (and logged need_metric)."""
    for r in runs(uri):
        if r.data.tags.get("seed") == str(seed) and r.info.status == "RUNNING" and "worker.pid" in r.data.tags:
            if need_metric is None or need_metric in r.data.metrics:
                return int(r.data.tags["worker.pid"])
    return None


# --- resume after SIGKILL --------------------------------------------------------------------------------------

@pytest.mark.slow  # about 1 min: two real multiruns of the CLI
def test_sigkill_mid_multirun_then_rerun_finishes_every_run_once(cli, tmp_path):
    argv, uri = cli
    cmd = [*argv, "seed=0,1", "train.max_steps=20", "-m"]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:  # job 1 mid-run: SIGKILL the whole process tree (kill -9 of the group, or a power cut)
        wait_for(lambda: worker_of(uri, 1), what="worker of seed 1")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert by_seed(uri) == {"0": ["FINISHED"], "1": ["RUNNING"]}, (tmp_path / "first.log").read_text()

    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "COLUMNS": "200"})
    out = again.stdout + again.stderr
    assert again.returncode == 0, out
    assert re.search(r"closed lora-local-hf-s1: left RUNNING by process \d+, which is gone; marked KILLED", out), out
    assert re.search(r"skip lora-local-hf-s0: finished earlier \(run [0-9a-f]{32}\)", out), out
    assert "2 runs: 1 finished now, 1 skipped" in out, out
    # every run FINISHED exactly once; the killed attempt stays KILLED; nothing RUNNING
    assert by_seed(uri) == {"0": ["FINISHED"], "1": ["KILLED", "FINISHED"]}
    killed = next(r for r in runs(uri) if r.info.status == "KILLED")
    assert killed.data.tags["error"].startswith("orphaned: process ")
    assert len({r.data.tags["run_key"] for r in runs(uri)}) == 2


# --- a worker killed by the OS; SIGTERM -------------------------------------------------------------------------

@pytest.mark.slow  # a whole command or several runs: kept out of the fast subset
def test_killed_worker_fails_its_run_and_sigterm_stops_the_multirun(cli, tmp_path):
    argv, uri = cli
    proc = subprocess.Popen([*argv, "seed=0,1,2", "train.max_steps=100000", "-m"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # job 0: its worker dies as if the OS out-of-memory killer took it: that run fails, the multirun goes on
    os.kill(wait_for(lambda: worker_of(uri, 0), what="worker of seed 0"), signal.SIGKILL)
    # job 1, training: SIGTERM to the multirun only; it forwards the signal to its worker
    worker = wait_for(lambda: worker_of(uri, 1, need_metric="params/trainable"), what="seed 1 training")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "stopped by SIGTERM: runs in progress were ended KILLED" in out
    assert by_seed(uri) == {"0": ["FAILED"], "1": ["KILLED"]}, out  # seed 2 never started
    found = {r.data.tags["seed"]: r.data.tags for r in runs(uri)}
    assert found["0"]["error"].startswith("worker process was killed by SIGKILL (often the OS out-of-memory killer")
    assert found["1"]["error"] == "Interrupted: interrupted by SIGTERM" and found["1"]["status"] == "KILLED"
    assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE


def test_sigterm_in_process_run_is_killed(tiny_overrides, tmp_path, monkeypatch):
    """train.isolate=false: the job runs in the Hydra process, which turns SIGTERM into a KILLED run."""
    def fit_until_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler raises in here
    monkeypatch.setattr("bench.core.train.fit", fit_until_signal)
    saved = {s: signal.getsignal(s) for s in faults.SIGNALS}
    try:
        with pytest.raises(faults.Interrupted):
            execute(compose(*tiny_overrides), tmp_path / "job")
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    (run,) = runs(compose(*tiny_overrides).tracking.uri)
    assert run.info.status == "KILLED" and run.data.tags["error"] == "Interrupted: interrupted by SIGTERM"
    assert Result.read(tmp_path / "job").status == "KILLED"


# --- failures stay with their run ------------------------------------------------------------------------------

@pytest.mark.slow  # a whole command or several runs: kept out of the fast subset
def test_nan_loss_and_out_of_memory_fail_their_run_not_the_multirun(tiny_overrides, tmp_path, monkeypatch):
    uri = compose(*tiny_overrides).tracking.uri
    nan = execute(compose(*tiny_overrides, "train.lr=1e12", "train.max_grad_norm=1e12"), tmp_path / "nan")
    assert nan.status == "FAILED"
    step = re.fullmatch(r"FloatingPointError: loss is (nan|inf) at step (\d+)", nan.error)
    assert step and 1 <= int(step.group(2)) <= 60, nan.error

    import bench.core.train
    real_fit = bench.core.train.fit
    for name, error in [("cuda", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")),
                        ("host", MemoryError())]:
        def out_of_memory(*args, **kwargs):
            raise error
        monkeypatch.setattr("bench.core.train.fit", out_of_memory)
        oom = execute(compose(*tiny_overrides, f"seed={1 if name == 'cuda' else 2}"), tmp_path / name)
        assert oom.status == "FAILED" and oom.error.startswith("out of memory: ")
    monkeypatch.setattr("bench.core.train.fit", real_fit)
    ok = execute(compose(*tiny_overrides, "seed=3", "train.max_steps=10"), tmp_path / "ok")  # the next job of the multirun
    assert ok.status == "FINISHED"

    found = {r.data.tags["seed"]: r for r in runs(uri)}
    assert found["0"].info.status == "FAILED" and found["0"].data.tags["error"] == nan.error
    assert found["1"].data.tags["error"] == "out of memory: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert found["2"].data.tags["error"] == "out of memory: MemoryError"
    assert found["3"].info.status == "FINISHED"


# --- resume: keys, skip, --rerun, orphans ----------------------------------------------------------------------

def test_run_key_covers_what_changes_the_result(tiny_overrides, toy_csv, tmp_path):
    base = resume.run_key(compose(*tiny_overrides))
    same = ["tracking.uri=sqlite:///elsewhere.db", "tracking.experiment=other", "train.isolate=true",
            "train.threads=1", "rerun=true"]
    for o in same:
        assert resume.run_key(compose(*tiny_overrides, o)) == base, o
    for o in ["seed=1", "train.lr=0.5", "method.r=4", "method=ia3", "train.max_steps=61", "task.max_train_samples=10"]:
        assert resume.run_key(compose(*tiny_overrides, o)) != base, o
    edited = tmp_path / "toy.csv"
    edited.write_text(toy_csv.read_text().replace("red", "crimson", 1))
    assert resume.run_key(compose(*tiny_overrides, f"task.path={edited}")) != base
    edited.write_text(toy_csv.read_text())  # same content at another path: a different input path, a new key
    assert resume.run_key(compose(*tiny_overrides, f"task.path={edited}")) != base


@pytest.mark.slow  # a whole command or several runs: kept out of the fast subset
def test_finished_run_is_skipped_and_rerun_forces_it(tiny_overrides, tmp_path, capsys):
    tiny_overrides = [*tiny_overrides, "train.max_steps=10"]
    uri = compose(*tiny_overrides).tracking.uri
    first = execute(compose(*tiny_overrides), tmp_path / "a")
    assert first.status == "FINISHED" and not first.skipped
    capsys.readouterr()
    second = execute(compose(*tiny_overrides), tmp_path / "b")
    assert capsys.readouterr().out.strip().splitlines()[-1] == \
        f"skip lora-local-hf-s0: finished earlier (run {first.run_id})"
    assert second.skipped and second.run_id == first.run_id and second.status == "FINISHED"
    assert second.metrics["test/accuracy"] == first.metrics["test/accuracy"]
    assert Result.read(tmp_path / "b").skipped and len(runs(uri)) == 1
    third = execute(compose(*tiny_overrides, "rerun=true"), tmp_path / "c")
    assert not third.skipped and third.run_id != first.run_id
    assert [r.info.status for r in runs(uri)] == ["FINISHED", "FINISHED"]


@pytest.mark.parametrize("argv, hydra", [
    (["--rerun", "seed=1"], ["seed=1", "rerun=true"]),
    (["seed=0,1", "-m", "train.max_steps=5"], ["seed=0,1", "train.max_steps=5", "--multirun"]),
    (["seed=0,1", "train.max_steps=5", "-m"], ["seed=0,1", "train.max_steps=5", "--multirun"]),
    (["-m", "seed=0,1", "--rerun", "train.lr=0.1"], ["seed=0,1", "train.lr=0.1", "rerun=true", "--multirun"]),
    (["seed=1", "--rerun", "rerun=false"], ["seed=1", "rerun=false"]),   # an explicit override wins
    (["seed=1", "--cfg", "job", "train.lr=0.1"], ["seed=1", "train.lr=0.1", "--cfg", "job"]),   # a flag's value stays
])
def test_flags_go_anywhere_and_rerun_is_an_override(argv, hydra):
    """Hydra's parser takes the overrides before the flags; main() reorders what the user wrote in any order."""
    from bench import __main__ as entry
    seen = {}
    orig = (sys.argv, entry._hydra_main, entry._preflight)
    try:
        sys.argv = ["bench", *argv]
        entry._preflight = lambda argv: 0
        entry._hydra_main = lambda: seen.setdefault("hydra", list(sys.argv))
        entry.main()
    finally:
        sys.argv, entry._hydra_main, entry._preflight = orig
        for s in faults.SIGNALS:
            signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)
    assert seen["hydra"] == ["bench", *hydra]


def test_hydra_private_parser_still_offers_what_main_reads():
    """python -m bench reads Hydra's flags from a private Hydra API (hydra-core is pinned to its tested minor range):
    a Hydra release that moves it must fail here with this message, not as an AttributeError in main()."""
    from bench import __main__ as entry
    parser = entry._hydra_parser()
    flags = {s for a in parser._actions for s in a.option_strings}
    assert {"--multirun", "-m", "--cfg", "--config-name"} <= flags, \
        f"hydra._internal.utils.get_args_parser changed: flags are now {sorted(flags)}; update bench/__main__.py"
    assert parser.parse_intermixed_args(["a=1", "-m", "b=2"]).overrides == ["a=1", "b=2"], \
        "Hydra's parser no longer collects overrides in args.overrides; update bench/__main__.py hydra_argv"


def test_orphans_are_closed_but_never_a_live_process_run(tiny_overrides):
    cfg = compose(*tiny_overrides)
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    short = subprocess.Popen(["sleep", "1"])
    gone = {"owner.pid": str(short.pid), "owner.started": f"{psutil.Process(short.pid).create_time():.2f}"}
    short.wait()
    live = tracker.start(cfg)                                       # this process holds it
    dead = tracker.start(cfg, gone)                                 # its process is gone
    reused = tracker.start(cfg, {"owner.started": "1.00"})          # our pid, but another process's start time
    worker_lives = tracker.start(cfg, {**gone, **resume.process_tags("worker")})
    elsewhere = tracker.start(cfg, {**gone, "owner.host": "another-host"})
    legacy = tracker.client.create_run(tracker.experiment_id, tags={"status": "RUNNING"}).info.run_id
    assert sorted(resume.close_orphans(tracker)) == sorted([dead, reused])
    status = {r.info.run_id: r.info.status for r in runs(cfg.tracking.uri)}
    assert status == {live: "RUNNING", dead: "KILLED", reused: "KILLED", worker_lives: "RUNNING",
                      elsewhere: "RUNNING", legacy: "RUNNING"}
    assert "ended without closing the run" in tracker.client.get_run(dead).data.tags["error"]


def test_summary_marks_skipped_runs_and_fails_only_on_failed_runs(capsys):
    cfg = compose()
    done = Result("lora-trec-minilm-s0", "FINISHED", "r1", {"test/accuracy": 0.9}, skipped=True)
    report([done, Result("head-trec-minilm-s0", "FINISHED", "r2", {"test/accuracy": 0.5})], cfg)
    out = capsys.readouterr().out
    assert "FINISHED (skipped)" in out and "2 runs: 1 finished now, 1 skipped" in out
    with pytest.raises(SystemExit) as e:
        report([done, Result("prefix-trec-minilm-s0", "FAILED", error="boom")], cfg)
    assert e.value.code == 1



def test_summary_shows_chrf_for_translation_runs_only_when_one_is_listed(capsys):
    """A chrf_bleu run has no accuracy: the table adds its test chrF and best validation chrF; a table of
    classification runs keeps its columns."""
    cfg = compose()
    acc = Result("lora-trec-minilm-s0", "FINISHED", "r1", {"test/accuracy": 0.9, "val/best_accuracy": 0.85})
    report([acc], cfg)
    assert "chrF" not in capsys.readouterr().out
    mt = Result("lora-translate_en_es-smollm2-s0", "FINISHED", "r2", {"test/chrf": 41.26, "val/best_chrf": 39.04})
    report([acc, mt], cfg)
    out = capsys.readouterr().out
    assert "test chrF" in out and "best val chrF" in out
    row = next(line for line in out.splitlines() if "lora-translate" in line)
    assert "41.3" in row and "39.0" in row

# --- parallel workers on one SQLite store ----------------------------------------------------------------------

PARALLEL_RUNS = 6   # over 4 workers: some workers take two jobs


@pytest.mark.slow  # a whole 8-job multirun on 4 joblib workers: about 90 s
def test_parallel_joblib_workers_lose_no_runs(cli, tmp_path):
    argv, uri = cli
    seeds = ",".join(str(s) for s in range(PARALLEL_RUNS))
    t0 = time.perf_counter()
    proc = subprocess.run([*argv, "hydra/launcher=joblib", "hydra.launcher.n_jobs=4", f"seed={seeds}",
                           "train.max_steps=4", "-m"], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "COLUMNS": "200"})
    out = proc.stdout + proc.stderr
    print(f"{PARALLEL_RUNS} runs in 4 parallel workers took {time.perf_counter() - t0:.0f} s")
    assert proc.returncode == 0, out
    assert "database is locked" not in out and "Traceback" not in out, out
    found = runs(uri)
    assert sorted(int(r.data.tags["seed"]) for r in found) == list(range(PARALLEL_RUNS))  # none lost, none twice
    assert {r.info.status for r in found} == {"FINISHED"}
    assert len({r.data.tags["owner.pid"] for r in found}) > 1  # several workers filled the store
    cores = len(os.sched_getaffinity(0))
    assert {r.data.tags["torch_threads"] for r in found} == {str(max(1, cores // 4))}
    spans = sorted((r.info.start_time, r.info.end_time) for r in found)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:]))  # runs overlapped in time
    assert f"{PARALLEL_RUNS} runs: {PARALLEL_RUNS} finished now" in out
    assert len(list((tmp_path / "sweep").glob("*/result.json"))) == PARALLEL_RUNS


WRITER = """
import sys
from omegaconf import OmegaConf
from bench.tracking import Tracker
uri, n, who = sys.argv[1], int(sys.argv[2]), sys.argv[3]
tracker = Tracker(uri, "peft-bench")  # all 4 processes create the new store at once
for i in range(n):
    cfg = OmegaConf.create({"method": {"name": "lora", "r": i}, "model": {"name": "m"}, "task": {"name": who},
                            "quant": {"name": "none"}, "seed": i, "train": {"lr": 0.1}})
    run_id = tracker.start(cfg)
    tracker.log_config(run_id, cfg)
    for step in range(5):
        tracker.log_metrics(run_id, {"train/loss": 1.0 / (step + 1), "val/accuracy": 0.5}, step)
    tracker.set_tags(run_id, {"mem_source": "test"})
    tracker.end(run_id, "FINISHED")
"""


@pytest.mark.slow  # a whole command or several runs: kept out of the fast subset
def test_store_takes_4_processes_writing_at_once(tmp_path):
    """The write pattern of a run (open, params, metrics, tags, close) from 4 processes at once on a new store."""
    uri, n = f"sqlite:///{tmp_path}/mlflow.db", 8
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, uri, str(n), f"w{i}"], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(4)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    assert not any("database is locked" in o for o in outs)
    found = runs(uri)
    assert len(found) == 4 * n and {r.info.status for r in found} == {"FINISHED"}
    assert len({(r.data.tags["task"], r.data.tags["seed"]) for r in found}) == 4 * n
    assert all(len(r.data.params) == 7 and r.data.metrics["train/loss"] == 0.2 for r in found)


# --- security basics -------------------------------------------------------------------------------------------

def test_secrets_never_reach_mlflow_and_checkpoints_are_safetensors(tiny_overrides, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_SECRET_FROM_ENV")
    cfg = compose(*tiny_overrides, "train.max_steps=4", "+task.hf_token=${oc.env:HF_TOKEN}",
                  "+model.api_key=SECRET-KEY-2", "+tracking.password=SECRET-PW-3")
    result = execute(cfg, tmp_path / "job")
    assert result.status == "FINISHED"
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    run = client.get_run(result.run_id)
    artifact = Path(client.download_artifacts(result.run_id, "config.yaml", str(tmp_path))).read_text()
    logged = json.dumps([run.data.params, run.data.tags]) + artifact
    for secret in ("hf_SECRET_FROM_ENV", "SECRET-KEY-2", "SECRET-PW-3"):
        assert secret not in logged
    assert run.data.params["train.max_steps"] == "4"  # the rest of the config is there
    assert not any(w in k for k in run.data.params for w in ("token", "api_key", "password"))
    ckpt = [p.name for p in (tmp_path / "job" / "ckpt").rglob("*") if p.is_file()]
    assert "adapter_model.safetensors" in ckpt
    assert not [n for n in ckpt if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))], ckpt  # no pickles


def test_secret_keys_are_dropped_by_flatten():
    conf = {"task": {"hf_token": "a", "HF_TOKEN": "b", "path": "x"}, "tracking": {"Password": "c", "uri": "u"},
            "model": {"api_key": "d", "apikey": "e", "client_secret": "f"}}
    assert flatten(conf) == {"task.path": "x", "tracking.uri": "u"}
    assert without_secrets(conf) == {"task": {"path": "x"}, "tracking": {"uri": "u"}, "model": {}}
    # a password inside a URL (a store on PostgreSQL) never reaches a param or the config artifact
    conf = {"tracking": {"uri": "postgresql://bench:s3cret@db:5432/mlflow"}, "task": {"path": "http://h/x.csv"}}
    assert flatten(conf) == {"tracking.uri": "postgresql://bench:***@db:5432/mlflow", "task.path": "http://h/x.csv"}
    assert without_secrets(conf)["tracking"]["uri"] == "postgresql://bench:***@db:5432/mlflow"


def test_remote_code_off_unless_the_model_config_asks():
    for yaml in sorted((ROOT / "conf" / "model").glob("*.yaml")):
        assert compose(f"model={yaml.stem}").model.trust_remote_code is False, yaml.name


def test_nothing_binds_beyond_localhost():
    sources = [*(ROOT / "bench").rglob("*.py"), ROOT / "README.md"]
    assert not [p for p in sources if "0.0.0.0" in p.read_text()]


# --- memory figures belong to their own job ------------------------------------------------------------------------

@pytest.mark.slow
def test_warm_forked_workers_keep_memory_figures_per_job(tmp_path):
    """MiniLM: `head` after `full` in one multirun peaks where `head` alone does (each job a fresh fork of the
    template), while in one process (train.isolate=false) the same `head` run inherits full's high-water mark."""
    short = ["train.max_steps=2", "train.eval_every=null", "task.max_train_samples=32", "task.max_eval_samples=16",
             "task.max_test_samples=16", "train.threads=1", "device=cpu", "forgetting=false", "deploy.latency=false",
             "deploy.merged_test=false"]   # peak train memory is measured before any of these

    def peaks(name: str, methods: str, *extra: str) -> dict[str, float]:
        uri = f"sqlite:///{tmp_path}/{name}.db"
        subprocess.run([sys.executable, "-m", "bench", f"method={methods}", *short, *extra, f"tracking.uri={uri}",
                        f"hydra.sweep.dir={tmp_path}/{name}", "-m"], cwd=tmp_path, check=True, capture_output=True)
        return {r.data.tags["method"]: r.data.metrics["mem/peak_train_bytes"] for r in runs(uri)}

    alone = peaks("alone", "head")["head"]
    after_full = peaks("forked", "full,head")
    shared = peaks("shared", "full,head", "train.isolate=false")
    assert after_full["full"] > alone + 100 * 2**20   # full's optimizer state alone is ~180 MiB
    assert abs(after_full["head"] - alone) < 0.05 * alone, (after_full, alone)
    assert shared["head"] > alone + 50 * 2**20, (shared, alone)   # the control: the check tells the two apart
