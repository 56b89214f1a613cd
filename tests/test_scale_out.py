"""Scaling out (README: Scaling out) against a real stack on 127.0.0.1, started once for the session with
`python -m bench.stack up`: PostgreSQL (Debian's package, run as its unprivileged user) and `mlflow server` on it.
Two sweep commands (two "hosts") share one study in PostgreSQL while a multirun logs to the same server; one
sweep command is SIGKILLed with its whole process group mid-trial (a power cut: nothing closes anything); Optuna's
heartbeat fails its trial, which is retried with the same parameters, and its MLflow run is closed KILLED. Runs
of other hosts are judged by their heartbeat tag. Tiny random-init BERT (plumbing, not learning)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter

import optuna
import psutil
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from tests.conftest import ROOT

pytest.importorskip("psycopg", reason="the cluster extra (pip install -e '.[cluster]')")
from bench.errors import BenchError  # noqa: E402
from bench.stack import Stack, down, postgres, status, up  # noqa: E402

LORA = ROOT / "sweeps" / "lora_rank_alpha.yaml"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stack_processes(stack_dir: str) -> list[str]:
    """Every process of the stack: those whose command line or an ancestor's names its folder (the postmaster,
    its backends, the MLflow server and its workers) and those of the server's session."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            family = [p, *p.parents()]
            if any(stack_dir in " ".join(q.cmdline()) for q in family) or os.getsid(p.pid) in _leaders:
                found.append(f"{p.pid} {' '.join(p.info['cmdline'] or [])[:120]}")
        except (OSError, psutil.Error):
            continue
    return found


_leaders: set[int] = set()   # the MLflow server's session


@pytest.fixture(scope="session")
def stack():
    """The stack, up once for the session (a folder the postgres user can reach: /tmp, not pytest's 0700 one)."""
    try:
        postgres.bin_dir()
    except BenchError as e:
        pytest.skip(str(e))
    folder = tempfile.mkdtemp(prefix="peft-bench-stack-")
    os.chmod(folder, 0o711)
    started = time.perf_counter()
    s = up(Stack(dir=f"{folder}/stack", mlflow_port=free_port(), pg_port=free_port(), workers=2))
    _leaders.add(s.mlflow_pid)
    s.up_seconds = time.perf_counter() - started
    os.environ[postgres.PASSWORD_ENV] = postgres.password(s.path)   # what every host exports
    yield s
    down(s.dir)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def server_args(stack, tiny_bert_dir, toy_csv, request) -> tuple[list[str], str]:
    """Overrides for runs on the stack's server, in an experiment of this test's own."""
    experiment = f"t-{request.node.name[:40]}-{os.getpid()}"
    return ([f"model=hf", f"model.name_or_path={tiny_bert_dir}", "task=local", f"task.path={toy_csv}",
             "train.max_steps=30", "train.eval_every=15", "train.log_every=5", "train.batch_size=16",
             "forgetting=false", "deploy.latency=false", "deploy.merged_test=false", "device=cpu",
             f"tracking.uri={stack.tracking_uri}", f"tracking.experiment={experiment}"], experiment)


def runs_of(stack, experiment: str):
    client = MlflowClient(stack.tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=1000) if exp else []


def env() -> dict[str, str]:
    return {**os.environ, "TQDM_DISABLE": "1", "COLUMNS": "200", "PYTHONPATH": str(ROOT)}


def test_stack_is_up_on_loopback_with_its_databases(stack):
    ok, lines = status(stack.dir)
    assert ok, lines
    assert f"on 127.0.0.1:{stack.pg_port}" in lines[0] and f"http://127.0.0.1:{stack.mlflow_port}" in lines[1]
    listening = {c.laddr for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN}
    assert {(a.ip, a.port) for a in listening if a.port in (stack.pg_port, stack.mlflow_port)} == \
        {("127.0.0.1", stack.pg_port), ("127.0.0.1", stack.mlflow_port)}   # bound to loopback only
    # the server runs as the unprivileged user; the password is on no command line
    pg = psutil.Process(postgres.running_pid(stack.path / "pg"))
    assert os.geteuid() != 0 or pg.username() == "postgres"
    secret = os.environ[postgres.PASSWORD_ENV]
    assert not [p.pid for p in psutil.process_iter(["cmdline"]) if secret in " ".join(p.info["cmdline"] or [])]
    assert secret not in (stack.path / "mlflow.log").read_text() + (stack.path / "stack.json").read_text()
    import optuna
    assert optuna.storages.RDBStorage(postgres.sqlalchemy_url(stack.db_url("optuna"))).get_all_studies() is not None


@pytest.mark.slow  # ~2 min: two sweep commands and a multirun against the server, one sweep killed
def test_two_sweep_hosts_and_a_multirun_survive_a_sigkilled_worker(stack, server_args, tmp_path):
    overrides, experiment = server_args
    storage = stack.db_url("optuna")
    study_name = f"scale-{os.getpid()}-{int(time.time())}"
    sweep = [sys.executable, "-m", "bench.sweep", str(LORA), "--trials", "4", "--study", study_name,
             "--storage", storage, "--heartbeat-interval", "1", "--grace-period", "4",
             "--reports", str(tmp_path / "reports"), "--out-dir", str(tmp_path / "out"), *overrides]
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("a", "b", "multirun")}
    a = subprocess.Popen(sweep, cwd=tmp_path, env=env(), stdout=logs["a"], stderr=subprocess.STDOUT,
                         start_new_session=True)
    b = subprocess.Popen(sweep, cwd=tmp_path, env=env(), stdout=logs["b"], stderr=subprocess.STDOUT,
                         start_new_session=True)
    multirun = subprocess.Popen([sys.executable, "-m", "bench", "method=lora,head", *overrides, "-m"], cwd=tmp_path,
                                env=env(), stdout=logs["multirun"], stderr=subprocess.STDOUT)
    opened = optuna.storages.RDBStorage(postgres.sqlalchemy_url(storage))

    def a_running():   # a trial of A's that has its MLflow run: A is mid-trial
        try:
            trials = optuna.load_study(study_name=study_name, storage=opened).get_trials(deepcopy=False)
        except KeyError:
            return None
        return next((t for t in trials if t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs
                     and t.user_attrs.get("worker", "").split(":")[1:2] == [str(a.pid)]), None)

    victim, deadline = None, time.monotonic() + 300
    try:
        while victim is None and time.monotonic() < deadline and a.poll() is None:
            victim = a_running()
            time.sleep(0.2)
        assert victim is not None, (tmp_path / "a.log").read_text()
        os.killpg(a.pid, signal.SIGKILL)   # A's command, its template and its trial's worker: a power cut
        a.wait(timeout=30)
        assert b.wait(timeout=600) == 0, (tmp_path / "b.log").read_text()
        assert multirun.wait(timeout=600) == 0, (tmp_path / "multirun.log").read_text()
    finally:
        for p in (a, b, multirun):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL) if p is not multirun else p.kill()

    trials = optuna.load_study(study_name=study_name, storage=opened).trials
    states = Counter(t.state for t in trials)
    assert states[TrialState.COMPLETE] + states[TrialState.PRUNED] == 4, states   # exactly the requested trials
    assert states[TrialState.RUNNING] == states[TrialState.WAITING] == 0
    killed = trials[victim.number]
    assert killed.state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].params == killed.params and retries[0].state in FINISHED
    assert f"trial {victim.number} FAILED  worker " in (tmp_path / "b.log").read_text()

    runs = runs_of(stack, experiment)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]   # no run left RUNNING
    by_id = {r.info.run_id: r for r in runs}
    assert by_id[killed.user_attrs["mlflow_run_id"]].info.status == "KILLED"
    for t in trials:   # nothing lost: every finished trial has its finished run with the objective
        if t.state in FINISHED:
            run = by_id[t.user_attrs["mlflow_run_id"]]
            assert run.info.status == ("FINISHED" if t.state == TrialState.COMPLETE else "KILLED")
            assert t.state != TrialState.COMPLETE or run.data.metrics["val/accuracy"] == pytest.approx(t.value)
    multirun_runs = [r for r in runs if "study" not in r.data.tags]
    assert sorted((r.data.tags["method"], r.info.status) for r in multirun_runs) == \
        [("head", "FINISHED"), ("lora", "FINISHED")]
    parents = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["optuna_storage"] == storage   # no password in it: PGPASSWORD carries that


@pytest.mark.slow  # ~35 s: two multiruns of two tiny runs each against the server
def test_multirun_twice_against_the_server_skips_every_finished_run(stack, server_args, tmp_path, monkeypatch,
                                                                     capsys):
    overrides, experiment = server_args
    cmd = [sys.executable, "-m", "bench", "seed=0,1", *overrides, "train.isolate=false", "-m"]
    first = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    again = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out
    assert out.count("finished earlier (run ") == 2 and "2 runs: 0 finished now, 2 skipped" in out, out
    runs = runs_of(stack, experiment)
    assert sorted((r.data.tags["seed"], r.info.status) for r in runs) == [("0", "FINISHED"), ("1", "FINISHED")]
    assert all(float(r.data.tags["heartbeat"]) > time.time() - 600 for r in runs)   # each carried a heartbeat
    # the report reads the server's PostgreSQL store with plain SQL: the same records as MLflow's REST API
    from bench.report import runs as report_runs
    key = lambda r: r.run_id  # noqa: E731
    records = sorted(report_runs.read_runs(stack.db_url("mlflow"), [experiment]), key=key)
    capsys.readouterr()
    monkeypatch.setattr(report_runs, "SLOW_READ_S", 0.0)   # every REST read counts as slow: it names the direct one
    assert records == sorted(report_runs.read_runs(stack.tracking_uri, [experiment]), key=key)
    slow = capsys.readouterr().err
    assert slow.startswith("read 2 runs through the server's REST API in ") and "--store-uri postgresql://" in slow
    # and each run's predictions, from the server's artifact folder (--artifacts-root) as through the server
    from bench.report.predictions import Reader
    local, served = Reader(stack.tracking_uri, str(stack.path / "artifacts")), Reader(stack.tracking_uri)
    served.prefetch(records)
    for r in records:
        mine, theirs = local(r), served(r)
        assert mine is not None and theirs is not None and (mine.correct == theirs.correct).all()


def test_orphans_of_other_hosts_are_closed_by_heartbeat_after_the_grace_period(stack, server_args, tmp_path):
    from bench.orchestration import heartbeat, resume
    from bench.tracking import Tracker
    _, experiment = server_args
    tracker = Tracker(stack.tracking_uri, experiment)
    elsewhere = {"owner.host": "another-host", "owner.pid": "4242", "owner.started": "1.00"}
    silent = tracker.client.create_run(tracker.experiment_id, run_name="silent", tags={
        **elsewhere, heartbeat.TAG: f"{time.time() - heartbeat.ORPHAN_AFTER_S - 60:.0f}"}).info.run_id
    beating = tracker.client.create_run(tracker.experiment_id, run_name="beating", tags={
        **elsewhere, heartbeat.TAG: f"{time.time() - 5:.0f}"}).info.run_id
    unknown = tracker.client.create_run(tracker.experiment_id, run_name="old", tags=elsewhere).info.run_id
    assert resume.close_orphans(tracker) == [silent]   # a pid of another host decides nothing; its heartbeat does
    status_of = {r.info.run_id: r for r in runs_of(stack, experiment)}
    assert status_of[silent].info.status == "KILLED"
    assert status_of[silent].data.tags["error"].startswith("orphaned: no heartbeat from another-host for ")
    assert status_of[beating].info.status == status_of[unknown].info.status == "RUNNING"
    with heartbeat.beating(tracker, unknown, interval_s=0.2):   # a live holder keeps its tag fresh
        time.sleep(0.5)
    assert heartbeat.age_s(tracker.client.get_run(unknown).data.tags) < 5
    for run_id in (beating, unknown):
        tracker.end(run_id, "FINISHED")


def test_bad_storage_is_one_line_exit_2_without_the_password(tiny_overrides, tmp_path, capsys):
    from bench.sweep.cli import main
    port = free_port()   # nothing listens there
    code = main([str(LORA), "--trials", "1", "--storage", f"postgresql://bench:s3cret@127.0.0.1:{port}/optuna",
                 "--reports", str(tmp_path / "r"), "--out-dir", str(tmp_path / "o"), *tiny_overrides])
    err = capsys.readouterr().err.strip()
    errors = [ln for ln in err.splitlines() if not ln.startswith("20")]   # less MLflow's own INFO lines on a new store
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error: --storage postgresql://bench:***@"), err
    assert "s3cret" not in err and "Traceback" not in err


def test_stack_refuses_a_busy_port_in_one_line(stack, tmp_path):
    folder = tempfile.mkdtemp(prefix="peft-bench-stack-")
    os.chmod(folder, 0o711)
    try:
        with pytest.raises(BenchError, match=f"--pg-port {stack.pg_port}: .* is in use"):
            up(Stack(dir=f"{folder}/s", pg_port=stack.pg_port, mlflow_port=free_port()))
    finally:
        down(f"{folder}/s")
        shutil.rmtree(folder, ignore_errors=True)


def test_down_leaves_no_process_behind(stack):
    """Last in this file: stops the session's stack (the fixture's own `down` then finds nothing to stop)."""
    before = stack_processes(stack.dir)
    assert before, "the stack's processes are visible while it runs"
    stopped = down(stack.dir)
    assert stopped[0].startswith("mlflow server (") and stopped[1] == "postgresql"
    deadline = time.monotonic() + 10
    while stack_processes(stack.dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stack_processes(stack.dir) == []
    ok, lines = status(stack.dir)
    assert not ok and "stopped" in lines[0] and "stopped" in lines[1]
    assert down(stack.dir) == []   # idempotent
