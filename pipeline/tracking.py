"""MLflow tracking: one experiment per profile, one MLflow run per pipeline run.

Every stage of one pipeline run logs into the same MLflow run (found by its
`kiln.pipeline_run_id` tag), its parameters prefixed by the stage, its step metrics as curves,
its files as artifacts, so that `mlflow ui` compares whole pipeline runs side by side. The
embedded default is `sqlite:///registry/mlflow.db` with artifacts under `registry/artifacts`;
MLFLOW_TRACKING_URI points kiln at any tracking server instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import KilnError
from pipeline.layout import REGISTRY_DIR, REPO_ROOT


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REGISTRY_DIR / 'mlflow.db'}"


def _store_dir(uri: str) -> Path | None:
    """The folder of a local sqlite store; None for a tracking server."""
    return Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else None


LOCK_DATABASE_ENV = "KILN_LOCK_DATABASE_URL"  # PostgreSQL whose advisory locks a tracking server's users share
LOCK_WAIT_S = 300  # how long a promotion waits for another one before it gives up


# what an error from a tracking server that is restarting or out of reach says (requests, urllib3, a proxy)
UNREACHABLE_SIGNS = ("Connection refused", "Max retries exceeded", "Connection aborted", "RemoteDisconnected",
                     "timed out", "502", "503", "504")  # fmt: skip


def server_unavailable(uri: str, exc: BaseException) -> bool:
    """True when `exc` says the tracking server could not be reached, or the server does not answer
    now: worth retrying the stage, unlike a bug or a bad input. Never for a local store."""
    if _store_dir(uri) is not None or not uri.startswith(("http://", "https://")):
        return False
    chain, seen = [], exc
    while seen is not None:
        chain.append(str(seen))
        seen = seen.__cause__ or seen.__context__
    if any(sign in text for text in chain for sign in UNREACHABLE_SIGNS):
        return True
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5):
            return False
    except OSError:
        return True


def lock_dir(uri: str) -> Path:
    """Where the lock files of a local store live: beside it (else /tmp, for `lock` without a lock database)."""
    return _store_dir(uri) or Path("/tmp")


def shared_lock_url(uri: str) -> str | None:
    """The lock database of a tracking server (None for a local store, or when it is not set)."""
    return None if _store_dir(uri) else os.environ.get(LOCK_DATABASE_ENV) or None


def lock(uri: str, name: str):
    """An exclusive lock named `name` among everyone using `uri`: a PostgreSQL advisory lock when the
    tracking server has a lock database (every machine that reaches it), else a file lock (this machine)."""
    url = shared_lock_url(uri)
    return advisory_lock(url, name) if url else file_lock(lock_dir(uri) / f".{name}.lock")


@contextlib.contextmanager
def advisory_lock(url: str, name: str) -> Iterator[None]:
    """An exclusive lock held in PostgreSQL by this process's connection: released when the block ends,
    or by the server when the connection drops, so a killed process never leaves it held."""
    import psycopg2

    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)  # bigint lock id
    try:
        conn = psycopg2.connect(url, connect_timeout=10, application_name=f"kiln lock {name}")
    except psycopg2.Error as exc:  # the message names host and port, never the password
        raise KilnError(f"{LOCK_DATABASE_ENV}: the lock database does not answer ({str(exc).strip()[:200]})") from None
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(f"SET lock_timeout = '{LOCK_WAIT_S}s'")
            try:
                cur.execute("SELECT pg_advisory_lock(%s)", (key,))
            except psycopg2.errors.LockNotAvailable:
                raise KilnError(f"{name}: another process held the lock for {LOCK_WAIT_S} s; try again") from None
            try:
                yield
            finally:
                cur.execute("SELECT pg_advisory_unlock(%s)", (key,))
    finally:
        conn.close()


def artifact_root(uri: str) -> str | None:
    """Artifacts beside a local sqlite store; a server keeps its own artifact store."""
    store = _store_dir(uri)
    return (store / "artifacts").as_uri() if store else None


def client(uri: str):
    import logging

    from mlflow import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its sqlite migrations log at INFO
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # an unreachable server should fail in seconds, not after MLflow's default minutes of retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    store = _store_dir(uri)
    if store:
        store.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes on this machine (runs, promotions)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def gpu_temperatures(uri: str, run_id: str, every_s: float) -> Iterator[None]:
    """GPU temperatures beside MLflow's system metrics, which sample GPU memory, utilisation and power
    through nvidia-ml-py but not temperature: `system/gpu_<i>_temperature_celsius` every `every_s`
    seconds while the block runs. Nothing without an NVIDIA GPU and its driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:  # no library, no driver, no GPU: there is nothing to sample
        yield
        return
    from mlflow.entities import Metric

    stop, c = threading.Event(), client(uri)

    def sample() -> None:
        step = 0
        while not stop.wait(every_s):
            now = int(time.time() * 1000)
            temps = [pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU) for h in handles]
            metrics = [Metric(f"system/gpu_{i}_temperature_celsius", t, now, step) for i, t in enumerate(temps)]
            with contextlib.suppress(Exception):  # a sample lost while the server restarts is not worth a stage
                c.log_batch(run_id, metrics=metrics)
            step += 1

    thread = threading.Thread(target=sample, name="kiln-gpu-temperature", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=every_s + 5)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def experiment_id(c, profile: str, uri: str) -> str:
    return named_experiment(c, f"kiln-{profile}", uri)


def named_experiment(c, name: str, uri: str) -> str:
    """The id of the experiment `name`, created (artifacts beside a local store) when it is new; two
    processes creating it at once both end with the one that exists."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=artifact_root(uri) and f"{artifact_root(uri)}/{name}")
    except Exception:
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def pipeline_run(uri: str, profile: str, pipeline_run_id: str) -> str:
    """The MLflow run of this pipeline run, created by whichever stage asks first."""
    c = client(uri)
    try:
        with lock(uri, f"kiln-{profile}.run"):  # parallel stages of one pipeline run must not create two runs
            exp = experiment_id(c, profile, uri)
            found = c.search_runs([exp], f"tags.`kiln.pipeline_run_id` = '{pipeline_run_id}'", max_results=1)
            if found:
                return found[0].info.run_id
            run = c.create_run(
                exp,
                run_name=f"{profile}-{pipeline_run_id[:8]}",
                tags={"kiln.pipeline_run_id": pipeline_run_id, "kiln.profile": profile, "git_commit": git_commit()},
            )
            return run.info.run_id
    except KilnError:
        raise
    except Exception as exc:  # mlflow raises many types for an unreachable or broken store
        raise KilnError(f"MLflow tracking at {uri} is not usable: {str(exc).splitlines()[0][:200]}") from None


def flatten(prefix: str, values: dict) -> dict:
    """Nested settings as flat `prefix.key.sub` parameters."""
    out = {}
    for key, value in values.items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            out.update(flatten(name, value))
        else:
            out[name] = str(value)[:500]
    return out


class StageLogger:
    """What one stage logs into the pipeline run."""

    def __init__(self, uri: str, run_id: str, stage: str):
        self.c, self.run_id, self.stage = client(uri), run_id, stage

    def params(self, values: dict) -> None:
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in flatten(self.stage, values).items()]
        for i in range(0, len(params), 100):
            self.c.log_batch(self.run_id, params=params[i : i + 100])

    def tags(self, values: dict) -> None:
        """Run tags named by the stage: `<stage>.<key>`."""
        from mlflow.entities import RunTag

        self.c.log_batch(self.run_id, tags=[RunTag(f"{self.stage}.{k}", str(v)) for k, v in values.items()])

    def metrics(self, values: dict, step: int | None = None) -> None:
        self._log([(k, v, step or 0) for k, v in values.items()])

    def history(self, rows: list[dict], keys: tuple[str, ...]) -> None:
        """Per-step curves: each row has `step` and some of `keys`."""
        self._log([(k, row[k], int(row["step"])) for row in rows for k in keys if k in row])

    def _log(self, points: list[tuple[str, float, int]]) -> None:
        """(name, value, step) points in batches of 500, MLflow's limit per call."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        ms = [Metric(f"{self.stage}.{k}", float(v), now, step) for k, v, step in points if _is_number(v)]
        for i in range(0, len(ms), 500):
            self.c.log_batch(self.run_id, metrics=ms[i : i + 500])

    def artifact(self, path: Path, folder: str = "") -> None:
        path = Path(path)
        where = f"{self.stage}/{folder}".rstrip("/")
        if path.is_dir():
            self.c.log_artifacts(self.run_id, str(path), where)
        elif path.exists():
            self.c.log_artifact(self.run_id, str(path), where)

    def image(self, png: bytes, name: str) -> None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            f = Path(tmp) / name
            f.write_bytes(png)
            self.artifact(f)


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v == v  # NaN is not logged
