"""Where clean_corpus's datatrove pipelines run: `clean.executor` in the profile.

    local   datatrove's LocalPipelineExecutor: worker processes on this machine
    ray     datatrove's RayPipelineExecutor on the Ray cluster at `clean.ray_address` (each task a
            Ray actor holding one CPU); the same steps, so the same files come out
    slurm   not run from here: docs/deploy/clean_slurm.py submits the pipelines as job arrays and
            finishes the run when the last array is done

On Ray every node must import kiln's `pipeline` package (the steps are kiln's own classes): start
each node's `ray start` from the same kiln install (`pip install 'kiln[ray]'`), or with the
checkout on PYTHONPATH, and put the work folder on a file system every node mounts.

`local_ray_cluster` starts a Ray cluster of several nodes on this machine's loopback address
(a head and workers, each its own `ray start` process), for trying the executor, the tests and
the benchmark.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pipeline.config import CleanSettings
from pipeline.errors import KilnError
from pipeline.io import free_port

MakeExecutor = Callable[[list, int, int, str], object]  # (steps, tasks, workers, logging_dir) -> a datatrove executor
RAY_MEMORY_PER_TASK_GB = 1.0  # what each task reserves of a node's memory; kiln's steps stream their documents


@contextlib.contextmanager
def datatrove_executor(settings: CleanSettings) -> Iterator[MakeExecutor]:
    """A maker of datatrove executors for `settings.executor`, connected for the block's length."""
    if settings.executor == "slurm":
        raise KilnError(
            "clean.executor is slurm: submit the cleaning with `python docs/deploy/clean_slurm.py submit ...` and "
            "finish it with `... finish` (Slurm runs the job arrays outside the pipeline)"
        )
    if settings.executor == "local":
        from datatrove.executor import LocalPipelineExecutor

        with terminable_workers():
            yield lambda steps, tasks, workers, logging_dir: LocalPipelineExecutor(
                steps, tasks=tasks, workers=workers, logging_dir=logging_dir
            )
        return
    with ray_connection(settings.ray_address):
        from datatrove.executor.ray import RayPipelineExecutor

        yield lambda steps, tasks, workers, logging_dir: RayPipelineExecutor(
            steps, tasks=tasks, workers=workers, logging_dir=logging_dir, cpus_per_task=1,
            mem_per_cpu_gb=RAY_MEMORY_PER_TASK_GB,
        )  # fmt: skip


@contextlib.contextmanager
def terminable_workers() -> Iterator[None]:
    """SIGTERM at its default for the block, where this process ignores it, so the worker processes
    started meanwhile inherit the default: datatrove's pool stops its idle workers with SIGTERM, and
    workers that ignore it never exit (the run hangs at its end). A job started in the background has
    SIGINT ignored, and Dagster points SIGTERM at SIGINT's handler, so such a process is common.
    Only the main thread may change a handler; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextlib.contextmanager
def ray_connection(address: str | None) -> Iterator[None]:
    """This process connected to the Ray cluster at `address` (None: $RAY_ADDRESS or a local instance)."""
    try:
        import ray
    except ImportError:
        raise KilnError("clean.executor is ray but Ray is not installed: pip install 'kiln[ray]'") from None
    if address:
        _check_reachable(address)  # Ray itself retries an absent cluster for minutes
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise KilnError(f"clean.ray_address {address}: no Ray cluster to connect to ({str(exc)[:200]})") from None
    try:
        yield
    finally:
        ray.shutdown()


def _check_reachable(address: str) -> None:
    """A KilnError naming `address` unless something accepts connections on its host:port."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=10):
            return
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise KilnError(f"clean.ray_address {address}: no Ray cluster to connect to ({reason})") from None


def _ray_command() -> list[str]:
    """`ray` of this interpreter's environment."""
    script = Path(sys.executable).with_name("ray")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ray.scripts.scripts"]


def _node_args() -> list[str]:
    """Ports a node takes; free ones, so several nodes (and runs) share one machine."""
    return [
        "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--object-store-memory", str(100 * 1024 * 1024),
        "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
        "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
        "--disable-usage-stats", "--block",
    ]  # fmt: skip


@contextlib.contextmanager
def local_ray_cluster(nodes: int = 2, timeout: float = 120) -> Iterator[str]:
    """A Ray cluster of `nodes` one-CPU nodes on 127.0.0.1, each a `ray start --block` process
    (stopped by its PID when the block ends); yields the head's address. The nodes import this
    checkout's `pipeline` (PYTHONPATH)."""
    root = Path(tempfile.mkdtemp(prefix="kiln-ray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]
        ).rstrip(os.pathsep),
    }
    port = free_port()
    address = f"127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []
    try:
        head = [*_ray_command(), "start", "--head", "--port", str(port), "--include-dashboard", "false",
                "--ray-client-server-port", str(free_port()), "--temp-dir", str(root), *_node_args()]  # fmt: skip
        procs.append(_start(head, env, root / "head.log"))
        _wait_for_nodes(address, 1, procs, timeout)
        for i in range(1, nodes):
            worker = [*_ray_command(), "start", "--address", address, *_node_args()]
            procs.append(_start(worker, env, root / f"worker{i}.log"))
        _wait_for_nodes(address, nodes, procs, timeout)
        yield address
    finally:
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(root, ignore_errors=True)


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as fh:
        return subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the `ray start --block` process, which stops the node's processes; then its own
    process group (it was started in a session of its own) if any are left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _wait_for_nodes(address: str, n: int, procs: list[subprocess.Popen], timeout: float) -> None:
    """Poll `ray status`-like until the cluster has `n` live nodes (generous deadline)."""
    deadline = time.monotonic() + timeout
    probe = [sys.executable, "-c", "import ray,sys; ray.init(address=sys.argv[1], logging_level='ERROR');"
             "print(sum(n['Alive'] for n in ray.nodes()))", address]  # fmt: skip
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise KilnError(f"a Ray node exited while starting (exit {proc.returncode}); see its log")
        done = subprocess.run(probe, capture_output=True, text=True, check=False)
        if done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(0.5)
    raise KilnError(f"the local Ray cluster at {address} did not reach {n} nodes in {timeout:.0f} s")
