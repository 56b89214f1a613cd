"""The stack's PostgreSQL server: Debian's `postgresql` binaries, a data folder made by `initdb`, started and
stopped with `pg_ctl`, always as an unprivileged user (PostgreSQL refuses to run as root: as root, the commands
run as the `postgres` user Debian's package creates, or BENCH_PG_OS_USER).

The password of the database superuser never appears on a command line or in a log: `initdb` reads it from a
file readable only by the server's user, which is deleted afterwards; clients read it from PGPASSWORD (libpq).
"""
from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from bench.errors import BenchError

DATABASES = ("mlflow", "optuna")   # the MLflow backend store and the Optuna studies
USER_ENV, PASSWORD_ENV = "PGUSER", "PGPASSWORD"   # libpq's own variables: every client on every host reads them
DEFAULT_USER = "bench"
CONF_NAME = "bench-stack.conf"     # the stack's settings, included from postgresql.conf and rewritten on each `up`


def sqlalchemy_url(url: str) -> str:
    """postgresql://... with the psycopg (3) driver named: SQLAlchemy's default driver for a bare postgresql://
    is psycopg2 before 2.1 and psycopg from 2.1; the `cluster` extra installs psycopg."""
    return "postgresql+psycopg://" + url.removeprefix("postgresql://") if url.startswith("postgresql://") else url


def bin_dir() -> Path:
    """The folder of initdb/pg_ctl/postgres: BENCH_PG_BIN, else the newest /usr/lib/postgresql/N/bin (Debian's
    package keeps them there, off PATH), else initdb on PATH."""
    env = os.environ.get("BENCH_PG_BIN")
    found = [Path(env)] if env else sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                                           key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.name)],
                                           reverse=True)
    on_path = shutil.which("initdb")
    found += [Path(on_path).resolve().parent] if on_path and not env else []
    for d in found:
        if (d / "initdb").is_file() and (d / "pg_ctl").is_file():
            return d
    where = f"BENCH_PG_BIN={env} has no initdb and pg_ctl" if env else "no initdb in /usr/lib/postgresql/*/bin or on PATH"
    raise BenchError(f"PostgreSQL not found ({where}); install Debian's package (apt-get install -y postgresql) "
                     "or set BENCH_PG_BIN to the folder that holds initdb and pg_ctl")


def os_user() -> str | None:
    """The user the server runs as: None (this user) unless this is root."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get("BENCH_PG_OS_USER", "postgres")
    try:
        pwd.getpwnam(name)
    except KeyError:
        raise BenchError(f"user {name!r} does not exist: PostgreSQL refuses to run as root, and the stack runs it as "
                         "that user (Debian's postgresql package creates `postgres`; or set BENCH_PG_OS_USER)") from None
    return name


def run(args: list, user: str | None, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run a PostgreSQL command as the server's user; a failure is one line with the command's own last line."""
    proc = subprocess.run([str(a) for a in args], user=user, capture_output=True, text=True, cwd="/", **kw)
    if check and proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise BenchError(f"{Path(args[0]).name} failed (exit {proc.returncode}): {last[0]}")
    return proc


def check_reachable(folder: Path, user: str | None) -> None:
    """The server's user must be able to enter every folder above its data folder."""
    if user is None:
        return
    uid = pwd.getpwnam(user).pw_uid
    for parent in reversed(folder.absolute().parents):
        st = parent.stat()
        if st.st_uid != uid and not st.st_mode & stat.S_IXOTH:
            raise BenchError(f"--dir {folder}: user {user} cannot enter {parent} (mode {stat.filemode(st.st_mode)}); "
                             f"PostgreSQL runs as {user}, so its data folder must be reachable by it: pass a --dir "
                             f"such as /srv/bench-stack or /tmp/bench-stack, or chmod o+x {parent}")


def password(stack_dir: Path) -> str:
    """PGPASSWORD when set, else the one kept in DIR/pgpassword (mode 0600), made on first use."""
    if os.environ.get(PASSWORD_ENV):
        return os.environ[PASSWORD_ENV]
    path = stack_dir / "pgpassword"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(24))
    return path.read_text().strip()


def initdb(data: Path, user: str | None, db_user: str, secret: str) -> None:
    """A new cluster in `data`, owned by the server's user, with scram-sha-256 password logins only."""
    data.mkdir(parents=True, exist_ok=True)
    if user:
        shutil.chown(data, user)
    data.chmod(0o700)
    fd, pwfile = tempfile.mkstemp(prefix="pgpw-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        if user:
            shutil.chown(pwfile, user)
        run([bin_dir() / "initdb", "-D", data, "-U", db_user, f"--pwfile={pwfile}", "--auth=scram-sha-256",
             "--encoding=UTF8", "--locale=C"], user)
    finally:
        os.unlink(pwfile)
    with open(data / "postgresql.conf", "a") as f:
        f.write(f"\ninclude_if_exists = '{CONF_NAME}'\n")


def configure(data: Path, user: str | None, host: str, port: int, sockets: Path) -> None:
    """Where the server listens (rewritten on each `up`) and who may log in: password logins over TCP from
    loopback, and from anywhere when it listens beyond loopback."""
    loopback = host in ("127.0.0.1", "localhost", "::1")
    listen = host if loopback else f"127.0.0.1,{host}"   # the MLflow server beside it connects on loopback
    conf = (f"listen_addresses = '{listen}'\nport = {port}\nunix_socket_directories = '{sockets}'\n"
            "max_connections = 200\n"
            # a client host that vanishes (power loss) drops its connection, and with it any advisory lock it held
            "tcp_keepalives_idle = 30\ntcp_keepalives_interval = 10\ntcp_keepalives_count = 3\n")
    hba = ["local all all scram-sha-256", "host all all 127.0.0.1/32 scram-sha-256", "host all all ::1/128 scram-sha-256"]
    if not loopback:
        hba += ["host all all all scram-sha-256"]   # any client address, still with the password
    for name, text in ((CONF_NAME, conf), ("pg_hba.conf", "\n".join(hba) + "\n")):
        (data / name).write_text(text)
        if user:
            shutil.chown(data / name, user)
    sockets.mkdir(exist_ok=True)
    if user:
        shutil.chown(sockets, user)


def start(data: Path, user: str | None, log: Path) -> None:
    log.touch()
    if user:
        shutil.chown(log, user)
    run([bin_dir() / "pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "start"], user)


def stop(data: Path, user: str | None) -> bool:
    """Stop the server (fast: open sessions are closed); False when it was not running."""
    if not running_pid(data):
        return False
    run([bin_dir() / "pg_ctl", "-D", data, "-w", "-t", "60", "-m", "fast", "stop"], user)
    return True


def running_pid(data: Path) -> int | None:
    """The postmaster's pid from postmaster.pid when that process lives."""
    try:
        pid = int((data / "postmaster.pid").read_text().split()[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, IndexError):
        return None


def create_databases(host: str, port: int, db_user: str, secret: str) -> list[str]:
    """Create the stack's databases that do not exist yet; returns those created."""
    psycopg = driver()
    with psycopg.connect(host=host, port=port, user=db_user, password=secret, dbname="postgres",
                         connect_timeout=10, autocommit=True) as conn:
        have = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
        made = [db for db in DATABASES if db not in have]
        for db in made:
            conn.execute(f'CREATE DATABASE "{db}"')
    return made


def driver():
    try:
        import psycopg
    except ImportError:
        raise BenchError("psycopg is not installed (PostgreSQL's driver): pip install 'peft-bench[cluster]'") from None
    return psycopg
