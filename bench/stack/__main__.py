"""python -m bench.stack up|down|status [--dir DIR] ...: the shared PostgreSQL + MLflow server (README: Scaling out)."""
from __future__ import annotations

import argparse
import os
import sys

from bench.errors import BenchError
from bench.stack import DEFAULT_DIR, Stack, down, status, up
from bench.stack.postgres import PASSWORD_ENV


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.stack", description="PostgreSQL and an MLflow server for "
                                "campaigns on several hosts, started on this machine.")
    p.add_argument("command", choices=("up", "down", "status"))
    p.add_argument("--dir", default=os.environ.get("BENCH_STACK_DIR", DEFAULT_DIR),
                   help=f"the stack's folder: data, artifacts, logs, stack.json (default $BENCH_STACK_DIR or {DEFAULT_DIR})")
    p.add_argument("--host", default="127.0.0.1", help="address both servers listen on (default 127.0.0.1, this "
                                                       "machine only; this host's network address for other hosts)")
    p.add_argument("--mlflow-port", type=int, default=5000)
    p.add_argument("--pg-port", type=int, default=5432)
    p.add_argument("--workers", type=int, default=2, help="mlflow server worker processes (default 2)")
    p.add_argument("--allowed-hosts", help="Host headers the MLflow server accepts besides localhost and private "
                                           "addresses, e.g. gpu-box:5000 (mlflow server --allowed-hosts)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        if a.command == "up":
            stack = up(Stack(dir=a.dir, host=a.host, mlflow_port=a.mlflow_port, pg_port=a.pg_port,
                             workers=a.workers, allowed_hosts=a.allowed_hosts))
            _, lines = status(a.dir)
            print("\n".join(lines))
            secret = "$PGPASSWORD" if os.environ.get(PASSWORD_ENV) else f"the password in {stack.path / 'pgpassword'}"
            print(f"every host: tracking.uri={stack.tracking_uri} (runs); --storage {stack.db_url('optuna')} "
                  f"(sweeps) with PGPASSWORD set to {secret}")
            return 0
        if a.command == "down":
            stopped = down(a.dir)
            print(f"stopped: {', '.join(stopped)}" if stopped else f"nothing was running from {a.dir}")
            return 0
        ok, lines = status(a.dir)
        print("\n".join(lines))
        return 0 if ok else 1
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
