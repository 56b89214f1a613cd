"""`python -m bench.stack up|down|status`: the shared stack a campaign on several hosts logs to, on this machine.

- PostgreSQL (bench/stack/postgres.py): the data folder DIR/pg, databases `mlflow` (MLflow's backend store) and
  `optuna` (the sweeps' studies), password logins only;
- `mlflow server` on that backend store, serving artifacts from DIR/artifacts (clients upload them through the
  server, so hosts share no file system).

Both bind to 127.0.0.1 unless --host says otherwise. DIR/stack.json records what runs where (ports, pids); the
password is PGPASSWORD, or the one `up` made in DIR/pgpassword, and is never written to a log or a command line.
README: Scaling out.
"""
from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from bench.errors import BenchError
from bench.stack import postgres

DEFAULT_DIR = "bench-stack"
STATE = "stack.json"
READY_TIMEOUT_S = 180   # the server's first start creates MLflow's tables in an empty database


@dataclass
class Stack:
    dir: str
    host: str = "127.0.0.1"
    mlflow_port: int = 5000
    pg_port: int = 5432
    pg_user: str = postgres.DEFAULT_USER
    workers: int = 2
    allowed_hosts: str | None = None
    mlflow_pid: int | None = None
    mlflow_started: float | None = None

    @property
    def path(self) -> Path:
        return Path(self.dir)

    @property
    def client_host(self) -> str:
        """Where this machine reaches the servers (a wildcard bind is reached on loopback)."""
        try:
            wildcard = ipaddress.ip_address(self.host).is_unspecified
        except ValueError:   # a host name
            wildcard = False
        return "127.0.0.1" if wildcard else self.host

    def db_url(self, db: str, host: str | None = None) -> str:
        """A database's URL without its password (libpq takes it from PGPASSWORD)."""
        return f"postgresql://{self.pg_user}@{host or self.client_host}:{self.pg_port}/{db}"

    @property
    def tracking_uri(self) -> str:
        return f"http://{self.client_host}:{self.mlflow_port}"

    def save(self) -> None:
        (self.path / STATE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str) -> "Stack | None":
        state = Path(folder) / STATE
        return cls(**json.loads(state.read_text())) if state.is_file() else None


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _mlflow_process(stack: Stack) -> psutil.Process | None:
    """The server's leading process when it still lives (pid and start time both match)."""
    if not stack.mlflow_pid:
        return None
    try:
        p = psutil.Process(stack.mlflow_pid)
        return p if abs(p.create_time() - (stack.mlflow_started or 0)) < 1 else None
    except psutil.Error:
        return None


def _session(leader: int) -> list[psutil.Process]:
    """Every process of the server's session (it was started as a session leader: uvicorn/gunicorn workers and
    any helper it spawned share the session)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.pid == leader or os.getsid(p.pid) == leader:
                found.append(p)
        except (OSError, psutil.Error):
            continue
    return found


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=3) as r:
            return r.status == 200
    except OSError:
        return False


def _start_mlflow(stack: Stack, secret: str) -> None:
    (stack.path / "artifacts").mkdir(exist_ok=True)
    backend = postgres.sqlalchemy_url(stack.db_url("mlflow", "127.0.0.1"))
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
           "--serve-artifacts", "--artifacts-destination", str((stack.path / "artifacts").absolute()),
           "--host", stack.host, "--port", str(stack.mlflow_port), "--workers", str(stack.workers),
           "--uvicorn-opts", "--log-level warning"]   # errors only: not a line per request
    if stack.allowed_hosts:
        cmd += ["--allowed-hosts", stack.allowed_hosts]
    env = {**os.environ, postgres.PASSWORD_ENV: secret,   # libpq reads it; never on the command line
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}   # MLflow's GenAI job runners: 7 processes nobody here uses
    log = open(stack.path / "mlflow.log", "ab")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, cwd=stack.path)
    log.close()
    stack.mlflow_pid, stack.mlflow_started = proc.pid, psutil.Process(proc.pid).create_time()
    stack.save()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not healthy(stack.tracking_uri):
        if proc.poll() is not None or time.monotonic() > deadline:
            what = f"exited with code {proc.returncode}" if proc.poll() is not None else \
                f"not answering after {READY_TIMEOUT_S} s"
            _stop_mlflow(stack)
            raise BenchError(f"mlflow server {what}; its log: {stack.path / 'mlflow.log'}")
        time.sleep(0.5)


def _stop_mlflow(stack: Stack, grace_s: float = 20) -> int:
    """SIGTERM the server's whole session, SIGKILL what is left after grace_s; returns how many processes ended."""
    leader = _mlflow_process(stack)
    if leader is None:
        return 0
    procs = _session(leader.pid)
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    stack.mlflow_pid = stack.mlflow_started = None
    stack.save()
    return len(procs)


def _prepare_optuna(stack: Stack, secret: str) -> None:
    """Create Optuna's tables once, here, rather than in the first workers of several hosts at once."""
    import optuna
    optuna.storages.RDBStorage(postgres.sqlalchemy_url(stack.db_url("optuna")),
                               engine_kwargs={"connect_args": {"password": secret}})


def up(stack: Stack) -> Stack:
    """Start PostgreSQL (initdb on first use) and the MLflow server; what already runs is left running."""
    stack.path.mkdir(parents=True, exist_ok=True)
    old = Stack.load(stack.dir)
    if old and _mlflow_process(old):
        stack.mlflow_pid, stack.mlflow_started = old.mlflow_pid, old.mlflow_started
    user = postgres.os_user()
    data, secret = stack.path / "pg", postgres.password(stack.path)
    postgres.check_reachable(data, user)
    if postgres.running_pid(data) is None:
        if not _port_free(stack.host, stack.pg_port):
            raise BenchError(f"--pg-port {stack.pg_port}: {stack.host}:{stack.pg_port} is in use (another "
                             "PostgreSQL?); pass a free port")
        if not (data / "PG_VERSION").is_file():
            postgres.initdb(data, user, stack.pg_user, secret)
        postgres.configure(data, user, stack.host, stack.pg_port, stack.path / "pg-run")
        postgres.start(data, user, stack.path / "postgres.log")
    elif old and (old.pg_port, old.host) != (stack.pg_port, stack.host):
        raise BenchError(f"PostgreSQL already runs on {old.host}:{old.pg_port} from {data}; "
                         "run `python -m bench.stack down` first to move it")
    postgres.create_databases(stack.client_host, stack.pg_port, stack.pg_user, secret)
    _prepare_optuna(stack, secret)
    stack.save()
    if _mlflow_process(stack) is None:
        if not _port_free(stack.host, stack.mlflow_port):
            raise BenchError(f"--mlflow-port {stack.mlflow_port}: {stack.host}:{stack.mlflow_port} is in use; "
                             "pass a free port")
        _start_mlflow(stack, secret)
    return stack


def down(folder: str) -> list[str]:
    """Stop the MLflow server and PostgreSQL; the data stays. Returns what was stopped."""
    stack = Stack.load(folder)
    stopped = []
    if stack is not None:
        n = _stop_mlflow(stack)
        if n:
            stopped.append(f"mlflow server ({n} process{'es' if n > 1 else ''})")
    data = Path(folder) / "pg"
    if data.is_dir() and postgres.stop(data, postgres.os_user()):
        stopped.append("postgresql")
    return stopped


def status(folder: str) -> tuple[bool, list[str]]:
    """Whether both servers run, and one line per component."""
    stack = Stack.load(folder)
    if stack is None:
        return False, [f"no stack in {folder} (start one with `python -m bench.stack up --dir {folder}`)"]
    pg = postgres.running_pid(stack.path / "pg")
    server = _mlflow_process(stack)
    ok = healthy(stack.tracking_uri) if server else False
    lines = [f"postgresql: {'running, pid ' + str(pg) if pg else 'stopped'} on {stack.host}:{stack.pg_port}, "
             f"data {stack.path / 'pg'}; databases: " + ", ".join(stack.db_url(d) for d in postgres.DATABASES),
             f"mlflow server: " + (f"running, pid {server.pid}" + ("" if ok else " (not answering /health)")
                                   if server else "stopped") + f" on {stack.tracking_uri}, "
             f"artifacts {stack.path / 'artifacts'}"]
    return bool(pg and ok), lines
