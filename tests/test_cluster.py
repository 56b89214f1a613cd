"""Cluster launchers (README: Scaling out > Cluster launchers): hydra-submitit-launcher, tested with submitit's local
executor (the SLURM path without SLURM), and the harness's own Ray launcher (hydra_plugins/bench_ray_launcher) on a
local Ray cluster this module starts on 127.0.0.1. Each job keeps the harness's isolation (a fresh worker process per
run) and its signal handling (a scheduler's SIGUSR2 or SIGTERM ends the run KILLED with the reason; after SIGUSR2
submitit requeues the job).

Plumbing on a tiny random-init BERT and a toy csv (the `cli` fixture), a real SQLite MLflow store shared by every
process, real processes and signals. Needs the `cluster` extra (pip install -e '.[cluster]'): skipped without it,
except under CI, which installs it, where a missing extra fails.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_reliability import cli, runs, wait_for  # noqa: F401 (cli: the fixture)


def needs(module: str) -> None:
    """Skip without the cluster extra; under CI (which installs it) fail instead, so the tests never skip there."""
    if importlib.util.find_spec(module) is None:
        message = f"{module} is not installed: pip install -e '.[cluster]'"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def job_env() -> dict[str, str]:
    """The command's (and the Ray head's) environment; Ray on loopback only: without this switch Ray turns 127.0.0.1
    into the machine's network address."""
    return {**os.environ, "COLUMNS": "200", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def by_seed(uri: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in sorted(runs(uri), key=lambda r: r.info.start_time):
        out.setdefault(r.data.tags["seed"], []).append(r)
    return out


def statuses(found: dict[str, list]) -> dict[str, list[str]]:
    return {seed: [r.info.status for r in rs] for seed, rs in found.items()}


def training_owner(uri: str, seed: int) -> int | None:
    """pid of the process holding the run of `seed` (a submitit job, a Ray worker) once the run is training."""
    for r in runs(uri):
        if r.data.tags.get("seed") == str(seed) and r.info.status == "RUNNING" and "params/trainable" in r.data.metrics:
            return int(r.data.tags["owner.pid"])
    return None


def assert_isolated(found: list, command_pid: int) -> None:
    """Every run trained in a fresh worker process of its own, under a job process that is not the command's."""
    workers = [r.data.tags["worker.pid"] for r in found]
    owners = {r.data.tags["owner.pid"] for r in found}
    assert len(set(workers)) == len(found), workers
    assert owners.isdisjoint(workers) and str(command_pid) not in owners, (owners, command_pid)


# --- the example configs -------------------------------------------------------------------------------------------

def test_example_launcher_configs_compose():
    needs("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        slurm = hydra_compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                              return_hydra_config=True).hydra.launcher
        ray = hydra_compose("config", overrides=["hydra/launcher=ray", "hydra.launcher.address=head.example:6379"],
                            return_hydra_config=True).hydra.launcher
    assert slurm._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (slurm.partition, slurm.cpus_per_task, slurm.signal_delay_s) == ("gpu", 4, 120)
    assert ray._target_ == "hydra_plugins.bench_ray_launcher.ray_launcher.RayLauncher"
    assert (ray.address, ray.num_cpus, ray.max_retries) == ("head.example:6379", 1, 0)


# --- SIGUSR2: forwarded to the worker, then handed to the job process's own handler -------------------------

def test_sigusr2_goes_to_the_worker_then_to_the_handler_installed_before():
    """Under submitit the handler installed before is submitit's (requeue the job): it must run only after the worker
    has had the signal (and closed its run); SIGTERM is not handed on (submitit only logs it)."""
    from bench.orchestration import faults
    seen = []

    class Worker:
        def send_signal(self, signum):
            seen.append(("worker", signum))

    saved = {s: signal.getsignal(s) for s in faults.SIGNALS}
    try:
        for s in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(s, lambda signum, frame: seen.append(("before", signum)))
        with faults.forwarding_signals(Worker()) as caught:
            signal.raise_signal(signal.SIGUSR2)
            signal.raise_signal(signal.SIGUSR2)   # forwarded again; the first one is what is recorded
        assert seen == [("worker", signal.SIGUSR2)] * 2 and caught["signum"] == signal.SIGUSR2
        faults.hand_on(caught)
        assert seen[-1] == ("before", signal.SIGUSR2) and len(seen) == 3
        seen.clear()
        with faults.forwarding_signals(Worker()) as caught:
            signal.raise_signal(signal.SIGTERM)
        faults.hand_on(caught)
        assert seen == [("worker", signal.SIGTERM)]
        faults.raise_on_signals()   # the harness's own handler is never handed the signal: its caller stops anyway
        with faults.forwarding_signals(Worker()) as caught:
            signal.raise_signal(signal.SIGUSR2)
        faults.hand_on(caught)
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    assert str(faults.Interrupted(signal.SIGUSR2)) == ("interrupted by SIGUSR2 (the scheduler's warning before the "
                                                       "job's time limit, e.g. SLURM --signal)")
    assert faults.interrupted_exit(128 + signal.SIGUSR2) == signal.SIGUSR2


# --- submitit: the local executor, as SLURM would run the jobs ---------------------------------------------------

@pytest.mark.slow  # a two-job multirun in submitit's job processes, one of them run twice: about 1-2 min
def test_submitit_local_two_jobs_finish_and_sigusr2_ends_a_run_killed_then_requeues_it(cli, tmp_path):  # noqa: F811
    needs("hydra_plugins.hydra_submitit_launcher")
    argv, uri = cli
    t0 = time.perf_counter()
    proc = subprocess.Popen([*argv, "seed=0,1", "train.max_steps=400", "hydra/launcher=submitit_local",
                             "hydra.launcher.cpus_per_task=1", "-m"], cwd=tmp_path, env=job_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # seed 1, training: SLURM's time-limit warning (--signal=USR2) to the job's process, which holds the run
        os.kill(wait_for(lambda: training_owner(uri, 1), timeout=300, what="seed 1 training"), signal.SIGUSR2)
        out, _ = proc.communicate(timeout=600)
    finally:
        proc.kill()
    print(f"submitit_local: 2 jobs (one requeued) took {time.perf_counter() - t0:.0f} s")
    assert proc.returncode == 0, out
    found = by_seed(uri)
    assert statuses(found) == {"0": ["FINISHED"], "1": ["KILLED", "FINISHED"]}
    killed = found["1"][0]
    assert killed.data.tags["error"] == ("Interrupted: interrupted by SIGUSR2 (the scheduler's warning before the "
                                         "job's time limit, e.g. SLURM --signal)")
    # submitit requeued the job: a new job process ran the run again from the start
    assert found["1"][1].data.tags["owner.pid"] != killed.data.tags["owner.pid"]
    assert_isolated([r for rs in found.values() for r in rs], proc.pid)
    assert {r.data.tags["torch_threads"] for rs in found.values() for r in rs} == {"1"}  # cpus_per_task
    assert "2 runs: 2 finished now" in out, out
    assert len(list((tmp_path / "sweep").glob("*/result.json"))) == 2


# --- Ray: a local cluster on 127.0.0.1 ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_cluster():
    """A one-node Ray cluster on 127.0.0.1 for this module (2 CPUs, no dashboard, a 75 MiB object store), in a process
    group of its own that teardown ends; yields its address."""
    needs("ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")   # Ray's socket paths must stay short
    log = Path(temp) / "start.log"
    head = None
    try:
        with open(log, "w") as f:   # `ray start`, run by this interpreter
            head = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                                     "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                                     "--include-dashboard=false", "--object-store-memory=78643200",
                                     "--disable-usage-stats", f"--temp-dir={temp}"],
                                    stdout=f, stderr=subprocess.STDOUT, env=job_env(), start_new_session=True)
        wait_for(lambda: "Ray runtime started" in log.read_text() or head.poll() is not None, timeout=180,
                 what="the Ray head")
        assert head.poll() is None, log.read_text()
        yield f"127.0.0.1:{port}"
    finally:
        if head is not None:
            head.send_signal(signal.SIGTERM)   # `ray start --block` stops the processes it started
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(head.pid, signal.SIGKILL)   # anything of its own group still there
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow  # the same two-job multirun twice, each job a Ray task: about 2 min
def test_ray_launcher_sigterm_ends_a_run_killed_and_the_rerun_finishes_both_jobs(cli, ray_cluster,  # noqa: F811
                                                                                   tmp_path):
    argv, uri = cli
    cmd = [*argv, "seed=0,1", "train.max_steps=400", "hydra/launcher=ray", f"hydra.launcher.address={ray_cluster}",
           "-m"]
    t0 = time.perf_counter()
    first = subprocess.Popen(cmd, cwd=tmp_path, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    try:
        # seed 1, training: SIGTERM to the Ray worker process that runs its job (a node being shut down)
        os.kill(wait_for(lambda: training_owner(uri, 1), timeout=300, what="seed 1 training"), signal.SIGTERM)
        out, _ = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 128 + signal.SIGTERM, out   # once seed 0 has finished, the command stops
    assert "stopped by SIGTERM: runs in progress were ended KILLED" in out, out
    found = by_seed(uri)
    assert statuses(found) == {"0": ["FINISHED"], "1": ["KILLED"]}
    assert found["1"][0].data.tags["error"] == "Interrupted: interrupted by SIGTERM"
    # the same command again: seed 0 is skipped, seed 1 runs anew
    second = subprocess.run(cmd, cwd=tmp_path, env=job_env(), capture_output=True, text=True, timeout=300)
    out = second.stdout + second.stderr
    print(f"ray: the two commands took {time.perf_counter() - t0:.0f} s")
    assert second.returncode == 0, out
    found = by_seed(uri)
    assert statuses(found) == {"0": ["FINISHED"], "1": ["KILLED", "FINISHED"]}
    assert f"skip {found['0'][0].info.run_name}: finished earlier" in out, out
    assert "2 runs: 1 finished now, 1 skipped" in out, out
    assert_isolated([r for rs in found.values() for r in rs], first.pid)
    assert {r.data.tags["torch_threads"] for rs in found.values() for r in rs} == {"1"}  # hydra.launcher.num_cpus
    assert len(list((tmp_path / "sweep").glob("*/result.json"))) == 2


def test_ray_launcher_unreachable_cluster_is_one_line_and_exit_2(cli, tmp_path):  # noqa: F811
    needs("ray")
    argv, uri = cli
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]   # nothing listens there
    proc = subprocess.run([*argv, "seed=0,1", "train.max_steps=4", "hydra/launcher=ray",
                           f"hydra.launcher.address=127.0.0.1:{port}", "-m"], cwd=tmp_path, env=job_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"error: hydra.launcher.address=127.0.0.1:{port}: no Ray cluster there" in proc.stderr
    assert runs(uri) == []
