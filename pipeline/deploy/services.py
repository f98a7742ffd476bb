"""The production deployment on one machine: PostgreSQL, an MLflow tracking server on it, a
Dagster instance on the same database, and Prometheus scraping `kiln serve` while it runs
(pipeline/deploy/prometheus.py), started and stopped by kiln.

    python -m pipeline.deploy.services up      # (make services) start what is not running, print the environment
    python -m pipeline.deploy.services env     # the environment again, for eval "$(...)"
    python -m pipeline.deploy.services status  # (make services-status) each service: up or down, pid, port, URL
    python -m pipeline.deploy.services restart mlflow
    python -m pipeline.deploy.services down    # (make services-down) stop everything; the data stays

Everything lives in one folder (`.services/` in the checkout, or KILN_SERVICES_DIR):

    pg/data/            the PostgreSQL cluster (owned by an unprivileged user when run as root:
                        initdb refuses root), databases mlflow, dagster and kiln
    mlflow/artifacts/   the tracking server's artifact store (`--serve-artifacts`: clients upload
                        and download through the server, so they need no access to this folder)
    dagster_home/       dagster.yaml: run, event-log and schedule storage in PostgreSQL, the queued
                        run coordinator with kiln's concurrency limits
    prometheus/         Prometheus (Debian's package): scrape config, alert rules, the gateways it
                        scrapes (targets/, written by each running `kiln serve`), its data
    logs/               each service's log file
    state.json          ports, process ids and the database password (mode 600)
    env.sh              the printed environment, for `source`

Ports are free loopback ports chosen on the first `up` and kept while they stay free.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pipeline.deploy import prometheus
from pipeline.deploy.apt import apt_install
from pipeline.errors import KilnError
from pipeline.io import atomic_path, free_port, writable_folder, write_json
from pipeline.layout import PROMETHEUS_TARGETS_ENV, REPO_ROOT, services_dir_from_env

PG_USER = "kiln"  # the database role kiln's services connect as
DATABASES = ("mlflow", "dagster", "kiln")  # tracking server, Dagster instance, release locks
SYSTEM_USER = "postgres"  # Debian's package creates it; `useradd` makes it when missing
STARTUP_TIMEOUT_S = 180  # the tracking server migrates its schema on first start: slow on a busy machine

# At most one run that trains at a time (it takes every core or the GPU), and one run per group.
RUN_QUEUE = {
    "max_concurrent_runs": 4,
    "tag_concurrency_limits": [
        {"key": "kiln/compute", "value": "accelerator", "limit": 1},
        {"key": "kiln/group", "value": {"applyLimitPerUniqueValue": True}, "limit": 1},
    ],
}


@dataclass(frozen=True)
class Services:
    """The paths of one services folder."""

    root: Path

    @property
    def pg(self) -> Path:
        return self.root / "pg"

    @property
    def pgdata(self) -> Path:
        return self.pg / "data"

    @property
    def artifacts(self) -> Path:
        return self.root / "mlflow" / "artifacts"

    @property
    def dagster_home(self) -> Path:
        return self.root / "dagster_home"

    @property
    def work_dir(self) -> Path:
        """Where the production deployment's artifacts go (KILN_WORK_DIR)."""
        return self.root / "work"

    @property
    def prometheus(self) -> Path:
        return self.root / "prometheus"

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    def state(self) -> dict:
        if not self.state_file.exists():
            return {}
        return json.loads(self.state_file.read_text())

    def save(self, state: dict) -> None:
        write_json(self.state_file, state)
        self.state_file.chmod(0o600)  # it holds the database password


# --- PostgreSQL ---------------------------------------------------------------------------------


def postgres_bin() -> Path | None:
    """Debian keeps initdb and pg_ctl in /usr/lib/postgresql/<version>/bin, off the PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    which = shutil.which("initdb")
    return Path(which).parent if which else None


def ensure_postgres() -> Path:
    """The PostgreSQL programs, installed from Debian's `postgresql` package when missing and root
    (as the Makefile's `postgres` target does); a KilnError saying how to install them otherwise."""
    apt_said = apt_install("postgresql") if postgres_bin() is None else ""
    found = postgres_bin()
    if found is None:
        why = f" (apt-get install postgresql: {apt_said})" if apt_said else ""
        raise KilnError(f"PostgreSQL is not installed: sudo apt-get install -y postgresql (Debian's package){why}")
    return found


def _system_user() -> pwd.struct_passwd | None:
    """Who runs PostgreSQL: this user, or an unprivileged system user when this is root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SYSTEM_USER],
                       check=True, capture_output=True)  # fmt: skip
        return pwd.getpwnam(SYSTEM_USER)


def _as_db_user(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    user = _system_user()
    if user:
        kwargs.update(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def _reachable_by(user: pwd.struct_passwd | None, folder: Path) -> None:
    """The database user must be able to walk down to its cluster: a KilnError naming the first
    folder on the way that it cannot enter."""
    if user is None:
        return
    for parent in reversed(folder.resolve().parents):
        if not parent.stat().st_mode & 0o001:
            raise KilnError(f"{parent}: the {user.pw_name} user cannot enter it (chmod o+x, or choose "
                            "another KILN_SERVICES_DIR)")  # fmt: skip


def init_cluster(s: Services, password: str) -> None:
    """A new cluster in pg/data with the role `kiln` (password authentication, loopback only)."""
    if (s.pgdata / "PG_VERSION").exists():
        return
    bindir, user = ensure_postgres(), _system_user()
    s.pg.mkdir(parents=True, exist_ok=True)
    _reachable_by(user, s.pg)
    pwfile = s.pg / "pwfile"
    pwfile.write_text(password + "\n")
    if user:
        for path in (s.pg, pwfile):
            os.chown(path, user.pw_uid, user.pw_gid)
    pwfile.chmod(0o600)
    done = _as_db_user([str(bindir / "initdb"), "-D", str(s.pgdata), "-U", PG_USER, f"--pwfile={pwfile}",
                        "--auth=scram-sha-256", "--encoding=UTF8", "--no-locale"], cwd=s.pg)  # fmt: skip
    pwfile.unlink()
    if done.returncode != 0:
        raise KilnError(f"initdb failed in {s.pgdata}: {(done.stderr or done.stdout).strip().splitlines()[-1]}")
    with open(s.pgdata / "postgresql.conf", "a") as fh:
        # loopback TCP only; no Unix socket, so nothing depends on /var/run/postgresql
        fh.write("\n# kiln\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\nmax_connections = 200\n")


def pg_running(s: Services) -> bool:
    bindir = postgres_bin()
    if bindir is None or not (s.pgdata / "PG_VERSION").exists():
        return False
    return _as_db_user([str(bindir / "pg_ctl"), "status", "-D", str(s.pgdata)], cwd=s.pg).returncode == 0


def start_postgres(s: Services, port: int) -> None:
    if pg_running(s):
        return
    log = s.log("postgres")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.touch()
    user = _system_user()
    if user:
        os.chown(log, user.pw_uid, user.pw_gid)
    pg_ctl = str(ensure_postgres() / "pg_ctl")
    done = _as_db_user([pg_ctl, "start", "-w", "-t", "60", "-D", str(s.pgdata), "-l", str(log), "-o", f"-p {port}"],
                       cwd=s.pg)  # fmt: skip
    if done.returncode != 0:
        raise KilnError(f"PostgreSQL did not start on port {port}; its log is {log}")


def stop_postgres(s: Services) -> None:
    if pg_running(s):
        _as_db_user([str(postgres_bin() / "pg_ctl"), "stop", "-w", "-m", "fast", "-D", str(s.pgdata)], cwd=s.pg)


def database_url(state: dict, db: str, driver: str = "postgresql") -> str:
    """`driver` postgresql+psycopg2 for SQLAlchemy (MLflow, Dagster): its default PostgreSQL driver
    is psycopg 3, which kiln does not install."""
    return f"{driver}://{PG_USER}:{state['password']}@127.0.0.1:{state['pg_port']}/{db}"


def create_databases(state: dict) -> None:
    import psycopg2

    conn = psycopg2.connect(database_url(state, "postgres"), connect_timeout=10)
    conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    try:
        with conn.cursor() as cur:
            for db in DATABASES:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{db}"')
    finally:
        conn.close()


# --- processes we start: the tracking server, the Dagster daemon and UI ---------------------------


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")  # a zombie is gone


def _spawn(s: Services, name: str, cmd: list[str], env: dict) -> int:
    """Start a service in its own process group, its output appended to logs/<name>.log."""
    log = s.log(name)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=REPO_ROOT, start_new_session=True)  # fmt: skip
    return proc.pid


def _stop(pid: int | None, timeout: float = 20) -> None:
    """SIGTERM to the service's process group (its workers too), SIGKILL after `timeout`."""
    if not alive(pid):
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.2)
    if alive(pid):
        os.killpg(pid, signal.SIGKILL)
    _reap(pid)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):  # ours when this process started it; else nothing to do
        os.waitpid(pid, os.WNOHANG)


def _wait_http(url: str, pid: int, log: Path, what: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if not alive(pid):
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
            raise KilnError(f"{what} exited while starting: {tail[0] if tail else 'no output'} (log: {log})")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise KilnError(f"{what} did not answer {url} within {STARTUP_TIMEOUT_S} s (log: {log})")


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def start_mlflow(s: Services, state: dict) -> None:
    if alive(state.get("mlflow_pid")):
        return
    s.artifacts.mkdir(parents=True, exist_ok=True)
    cmd = [_bin("mlflow"), "server", "--backend-store-uri", database_url(state, "mlflow", "postgresql+psycopg2"),
           "--serve-artifacts", "--artifacts-destination", str(s.artifacts),
           "--host", "127.0.0.1", "--port", str(state["mlflow_port"]), "--workers", "1"]  # fmt: skip
    state["mlflow_pid"] = _spawn(s, "mlflow", cmd, dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
    s.save(state)
    _wait_http(f"http://127.0.0.1:{state['mlflow_port']}/health", state["mlflow_pid"], s.log("mlflow"), "mlflow")


def stop_mlflow(s: Services, state: dict) -> None:
    _stop(state.pop("mlflow_pid", None))
    s.save(state)


def start_prometheus(s: Services, state: dict) -> None:
    """Prometheus with kiln's rules, scraping each `kiln serve` announced in prometheus/targets/."""
    if alive(state.get("prometheus_pid")):
        return
    prometheus.write_config(s.prometheus)
    state["prometheus_pid"] = _spawn(s, "prometheus", prometheus.command(s.prometheus, state["prometheus_port"]),
                                     dict(os.environ))  # fmt: skip
    s.save(state)
    url = f"http://127.0.0.1:{state['prometheus_port']}/-/ready"
    _wait_http(url, state["prometheus_pid"], s.log("prometheus"), "prometheus")


def write_dagster_yaml(s: Services) -> Path:
    """Run, event-log and schedule storage in PostgreSQL (its URL from the environment, so the file
    holds no password), the queued run coordinator with kiln's limits, no telemetry."""
    import yaml

    config = {
        "storage": {"postgres": {"postgres_url": {"env": "KILN_DAGSTER_DATABASE_URL"}}},
        "run_coordinator": {
            "module": "dagster._core.run_coordinator", "class": "QueuedRunCoordinator", "config": RUN_QUEUE,
        },
        "telemetry": {"enabled": False},
    }  # fmt: skip
    s.dagster_home.mkdir(parents=True, exist_ok=True)
    with atomic_path(s.dagster_home / "dagster.yaml") as tmp:
        header = "# written by `python -m pipeline.deploy.services up`\n"
        tmp.write_text(header + yaml.safe_dump(config, sort_keys=False))
    return s.dagster_home / "dagster.yaml"


def start_dagster(s: Services, state: dict, ui: bool) -> None:
    """The daemon (queued runs, the schedule, the sensor) and, with `ui`, the web UI."""
    env = dict(os.environ, **environment(s, state))
    workspace = ["-w", str(REPO_ROOT / "workspace.yaml")]
    if not alive(state.get("daemon_pid")):
        state["daemon_pid"] = _spawn(s, "dagster-daemon", [_bin("dagster-daemon"), "run", *workspace], env)
    if ui and not alive(state.get("ui_pid")):
        cmd = [_bin("dagster-webserver"), *workspace, "-h", "127.0.0.1", "-p", str(state["ui_port"])]
        state["ui_pid"] = _spawn(s, "dagster-webserver", cmd, env)
        s.save(state)
        _wait_http(f"http://127.0.0.1:{state['ui_port']}/server_info", state["ui_pid"], s.log("dagster-webserver"),
                   "dagster-webserver")  # fmt: skip
    s.save(state)


# --- the whole deployment -----------------------------------------------------------------------


def environment(s: Services, state: dict) -> dict[str, str]:
    """What a shell (or CI, or a teammate's machine pointed at this one) sets to use the deployment."""
    return {
        "KILN_DEPLOYMENT": "production",
        "KILN_WORK_DIR": str(s.work_dir),
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{state['mlflow_port']}",
        "DAGSTER_HOME": str(s.dagster_home),
        "KILN_DAGSTER_DATABASE_URL": database_url(state, "dagster", "postgresql+psycopg2"),
        "KILN_LOCK_DATABASE_URL": database_url(state, "kiln"),
        PROMETHEUS_TARGETS_ENV: str(s.prometheus / "targets"),
    }


def _ports(state: dict, pg_up: bool) -> dict:
    """Keep each recorded port while it is free or held by our own service; choose a new one otherwise."""
    for key, ours in (
        ("pg_port", pg_up),
        ("mlflow_port", alive(state.get("mlflow_pid"))),
        ("ui_port", alive(state.get("ui_pid"))),
        ("prometheus_port", alive(state.get("prometheus_pid"))),
    ):
        port = state.get(key)
        if not port or not (ours or port_free(port)):
            state[key] = free_port()
    return state


def up(root: Path | None = None, ui: bool = True, daemon: bool = True) -> dict[str, str]:
    """Start whatever is not running (PostgreSQL, its databases, the tracking server, dagster.yaml,
    the Dagster daemon and UI) and return the deployment's environment."""
    s = Services(writable_folder(Path(root or services_dir_from_env())))
    state = s.state()
    state.setdefault("password", secrets.token_urlsafe(18))
    state = _ports(state, pg_running(s))
    s.save(state)
    init_cluster(s, state["password"])
    start_postgres(s, state["pg_port"])
    create_databases(state)
    start_mlflow(s, state)
    start_prometheus(s, state)
    write_dagster_yaml(s)
    if daemon or ui:
        start_dagster(s, state, ui)
    env = environment(s, state)
    with atomic_path(s.root / "env.sh") as tmp:
        tmp.write_text("".join(f"export {k}='{v}'\n" for k, v in env.items()))
        tmp.chmod(0o600)
    return env


def down(root: Path | None = None) -> None:
    """Stop every service (the Dagster processes first: they write to the database); data stays."""
    s = Services(Path(root or services_dir_from_env()))
    state = s.state()
    for key in ("ui_pid", "daemon_pid", "mlflow_pid", "prometheus_pid"):
        _stop(state.pop(key, None))
    if s.state_file.exists():
        s.save(state)
    stop_postgres(s)


def restart_mlflow(root: Path | None = None) -> None:
    s = Services(Path(root or services_dir_from_env()))
    state = s.state()
    if not state:
        raise KilnError(f"no services in {s.root}: start them with `make services`")
    stop_mlflow(s, state)
    start_mlflow(s, state)


def status(root: Path | None = None) -> list[tuple[str, bool, str]]:
    """(service, running, where) for each service."""
    s = Services(Path(root or services_dir_from_env()))
    state = s.state()
    if not state:
        return [("services", False, f"never started in {s.root} (make services)")]
    pid = state.get
    return [
        ("postgresql", pg_running(s), f"127.0.0.1:{state['pg_port']}  data {s.pgdata}"),
        ("mlflow", alive(pid("mlflow_pid")), f"http://127.0.0.1:{state['mlflow_port']}  pid {pid('mlflow_pid')}"),
        ("dagster-daemon", alive(pid("daemon_pid")), f"pid {pid('daemon_pid')}  DAGSTER_HOME {s.dagster_home}"),
        ("dagster-webserver", alive(pid("ui_pid")), f"http://127.0.0.1:{state['ui_port']}  pid {pid('ui_pid')}"),
        (
            "prometheus",
            alive(pid("prometheus_pid")),
            f"http://127.0.0.1:{state.get('prometheus_port')}  pid {pid('prometheus_pid')}",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.deploy.services",
        description="kiln's production deployment on this machine: PostgreSQL, an MLflow tracking server on it, "
        "a Dagster instance (daemon and UI) on the same database and Prometheus scraping kiln serve. Data stays in "
        "the services folder.",
    )
    parser.add_argument(
        "action", choices=["up", "down", "status", "env", "restart"],
        help="up: start what is not running and print the environment; env: print it again; status: each "
        "service (exit 1 when one is down); restart mlflow: stop and start the tracking server; down: stop all",
    )  # fmt: skip
    parser.add_argument("service", nargs="?", choices=["mlflow"], help="for restart: the service to restart")
    parser.add_argument("--dir", type=Path, default=None, help="services folder (default: $KILN_SERVICES_DIR or "
                        ".services/ in the checkout)")  # fmt: skip
    parser.add_argument("--no-ui", action="store_true", help="up: leave the Dagster web UI off")
    args = parser.parse_args(argv)
    try:
        if args.action in ("up", "env"):
            env = up(args.dir, ui=not args.no_ui) if args.action == "up" else _saved_env(args.dir)
            print("".join(f"export {k}='{v}'\n" for k, v in env.items()), end="")
            if args.action == "up":
                _print_status(args.dir, sys.stderr)
        elif args.action == "down":
            down(args.dir)
        elif args.action == "restart":
            restart_mlflow(args.dir)
        else:
            return _print_status(args.dir, sys.stdout)
    except KilnError as exc:
        print(f"kiln: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _saved_env(root: Path | None) -> dict[str, str]:
    s = Services(Path(root or services_dir_from_env()))
    if not s.state():
        raise KilnError(f"no services in {s.root}: start them with `make services`")
    return environment(s, s.state())


def _print_status(root: Path | None, out) -> int:
    rows = status(root)
    for name, running, where in rows:
        print(f"{name:<18} {'up' if running else 'down':<5} {where}", file=out)
    return 0 if all(running for _, running, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
