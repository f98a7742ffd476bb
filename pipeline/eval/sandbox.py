"""A sandbox for model-written code: bubblewrap namespaces, an unprivileged user, resource limits.

What a HumanEval completion can reach:
- the system read-only and nothing else: /usr, the Python installation and a minimal /dev and
  /proc (bubblewrap builds a fresh root; /root, /home, /work, /etc are simply not there), with
  empty folders over site-packages and dist-packages: the standard library, no installed
  package (nor a copy of the HumanEval data with its tests);
- one writable folder, /scratch, a tmpfs of `disk_mb` that disappears with the sandbox;
- no network (its own empty network namespace), no view of other processes (its own pid
  namespace), a clean environment;
- a user id of its own (never root, no capabilities, no_new_privs), with limits on address
  space, CPU seconds, file size, open files and processes (a fork bomb stops at `processes`);
- at the timeout, or when the verdict is in, the whole sandbox is killed: bubblewrap is the pid
  namespace's init, and every process in the namespace dies with it.

The verdict never comes from the sandbox. The completion only defines the function; the scorer
runs the problem's own tests in its own process and each `candidate(...)` call crosses the wall
as a request, with the return value coming back as a plain value (`plain_values`): an early exit,
a printed marker or an exit hook is just a sandbox that stopped answering, and an object whose
`__eq__` always answers True cannot be sent at all.

Where bubblewrap is missing or cannot create namespaces, scoring refuses (`SandboxUnavailable`);
`unsafe=True` runs the same runner as a plain child process with the resource limits only.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import KilnError
from pipeline.eval import plain_values

SCRATCH = "/scratch"
MAX_REPLY_BYTES = 4 * 2**20

# Runs inside the sandbox after plain_values' source: the completion's program is defined, then
# each request line is one call of its function, answered with one reply line.
_RUNNER = r"""
import os, sys
_requests = os.fdopen(os.dup(0), "rb")
_replies = os.fdopen(os.dup(1), "wb")
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
os.dup2(2, 1)  # the program's prints go to stderr, away from the replies
def _reply(message):
    _replies.write(dumps(message))
    _replies.flush()
def _error(exc):
    return {"error": (type(exc).__name__ + ": " + str(exc))[:300]}
_start = loads(_requests.readline())
_namespace = {"__name__": "__main__"}
try:
    exec(compile(_start["source"], "<program>", "exec"), _namespace)
    _candidate = _namespace[_start["entry"]]
except BaseException as exc:
    _reply(_error(exc))
    raise SystemExit(1)
_reply({"ready": True})
for _line in _requests:
    _call = loads(_line)
    try:
        _answer = {"ok": encode(_candidate(*decode(_call["args"]), **decode(_call["kwargs"])))}
    except BaseException as exc:
        _answer = _error(exc)
    _reply(_answer)
"""


class SandboxUnavailable(KilnError):
    """Scoring would have to run untrusted code without isolation."""


@dataclass
class Outcome:
    passed: bool
    reason: str  # "passed", "timeout", "memory", "failed: <what went wrong>"


@dataclass(frozen=True)
class Limits:
    memory_mb: int = 512
    """Address space of each process."""
    file_mb: int = 16
    """Largest file it may write."""
    disk_mb: int = 64
    """Size of /scratch, everything it writes in all."""
    processes: int = 8
    """Processes and threads of its user at once (a program needs one; memory in all stays under
    processes x memory_mb)."""


_uids = itertools.count()
_uid_lock = threading.Lock()


def _fresh_uid() -> int:
    """A user id no other running sandbox has: the process limit counts per user."""
    with _uid_lock:
        return 200_000 + (os.getpid() % 20_000) * 1000 + next(_uids) % 1000


def _mounts() -> list[str]:
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    prefix = os.path.realpath(sys.base_prefix)
    if not prefix.startswith("/usr/"):
        for parent in reversed(Path(prefix).parents[:-1]):  # bubblewrap would copy a parent's 0700 (/root)
            args += ["--perms", "0755", "--dir", str(parent)]
        args += ["--ro-bind", prefix, prefix]
    for packages in _package_dirs():  # the standard library only: no installed package, no dataset file
        args += ["--tmpfs", packages]
    return args


def _package_dirs() -> list[str]:
    """Where installed packages live beside the standard library (site-packages, dist-packages)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    candidates = [stdlib / "site-packages", stdlib / "dist-packages", Path("/usr/lib/python3/dist-packages")]
    candidates += [Path(f"/usr/local/lib/{version}/dist-packages"), Path(f"/usr/local/lib/{version}/site-packages")]
    return [str(c.resolve()) for c in candidates if c.is_dir()]


def _python() -> str:
    """The base interpreter (not a virtualenv's, which may be a copy outside the base prefix):
    the sandbox sees that prefix, nothing else."""
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    return str(base.resolve()) if base.exists() else os.path.realpath(sys.executable)


def _bwrap_argv(command: list[str], timeout: float, limits: Limits) -> list[str]:
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": SCRATCH,
        "TMPDIR": SCRATCH,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    argv = ["bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    argv += ["--die-with-parent", "--new-session", "--clearenv"]
    for key, value in env.items():
        argv += ["--setenv", key, value]
    argv += _mounts() + ["--proc", "/proc", "--dev", "/dev"]
    argv += ["--perms", "1777", "--size", str(limits.disk_mb * 2**20), "--tmpfs", SCRATCH, "--chdir", SCRATCH]
    argv += ["--remount-ro", "/"]
    cpu = int(timeout) + 1
    argv += [
        "prlimit", f"--as={limits.memory_mb * 2**20}", f"--cpu={cpu}:{cpu + 1}", f"--fsize={limits.file_mb * 2**20}",
        "--nofile=64", "--core=0", f"--nproc={limits.processes}", "--",
    ]  # fmt: skip
    if os.geteuid() == 0:  # drop to a user of its own; without root, bubblewrap's user namespace does it
        uid = _fresh_uid()
        argv += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs"]
        argv += ["--inh-caps=-all", "--bounding-set=-all", "--"]
    else:
        argv[1:1] = ["--unshare-user"]
    return argv + command


@functools.cache
def check_available() -> None:
    """Raise SandboxUnavailable unless bubblewrap can build the sandbox on this machine."""
    if shutil.which("bwrap") is None:
        raise SandboxUnavailable(
            "HumanEval scoring runs completions in bubblewrap, and `bwrap` is not installed "
            "(apt-get install bubblewrap; --unsafe runs them without isolation)"
        )
    argv = _bwrap_argv([_python(), "-I", "-S", "-c", "pass"], 5, Limits())
    try:
        done = subprocess.run(argv, capture_output=True, timeout=30)
    except subprocess.TimeoutExpired:
        done = None
    if done is None or done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip().splitlines()[-1:] if done else ["timed out"]
        raise SandboxUnavailable(
            f"bubblewrap cannot build the HumanEval sandbox here ({why[0] if why else 'no message'}); "
            "--unsafe runs completions without isolation"
        )


def _unsafe_limits(timeout: float, limits: Limits):
    def apply() -> None:
        cpu = int(timeout) + 1
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * 2**20,) * 2)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_mb * 2**20,) * 2)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


class _Failure(Exception):
    """The sandbox did not answer a call with a plain value."""


class _Box:
    """One sandboxed runner process and its request/reply pipes, with a deadline on every read."""

    def __init__(self, timeout: float, limits: Limits, unsafe: bool):
        self.deadline = time.monotonic() + timeout
        self.stderr = tempfile.TemporaryFile()  # a file, not a pipe: nothing left running can hold the scorer  # noqa: SIM115 (lives as long as the child it serves)
        runner = Path(plain_values.__file__).read_text() + _RUNNER
        command = [_python(), "-I", "-S", "-c", runner]
        self.scratch = None
        if unsafe:
            self.scratch = tempfile.TemporaryDirectory(prefix="kiln-sandbox-")
            env = {"PATH": "/usr/bin:/bin", "HOME": self.scratch.name, "TMPDIR": self.scratch.name, "LANG": "C.UTF-8"}
            extra = {"cwd": self.scratch.name, "env": env, "preexec_fn": _unsafe_limits(timeout, limits)}
        else:
            command, extra = _bwrap_argv(command, timeout, limits), {"env": {}}
        self.proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, start_new_session=True, **extra
        )
        os.set_blocking(self.proc.stdin.fileno(), False)  # a runner that stops reading cannot block the scorer
        self.buffer = b""

    def _wait_for(self, fd: int, event: int) -> None:
        """Until `fd` is ready for `event` (poll, not select: any fd number works), or the deadline."""
        poller = select.poll()
        poller.register(fd, event)
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise _Failure("timeout")
            if poller.poll(left * 1000):
                return

    def send(self, message) -> None:
        data, fd = plain_values.dumps(message), self.proc.stdin.fileno()
        while data:
            self._wait_for(fd, select.POLLOUT)
            try:
                data = data[os.write(fd, data) :]
            except BlockingIOError:
                continue
            except OSError:  # the runner is gone
                raise _Failure(self._ended()) from None

    def receive(self) -> dict:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            self._wait_for(fd, select.POLLIN)
            chunk = os.read(fd, 65536)
            if not chunk:
                raise _Failure(self._ended())
            self.buffer += chunk
            if len(self.buffer) > MAX_REPLY_BYTES:
                raise _Failure("failed: a reply over the size limit")
        line, self.buffer = self.buffer.split(b"\n", 1)
        try:
            reply = plain_values.loads(line)
        except (ValueError, RecursionError):
            raise _Failure("failed: a reply that is not JSON") from None
        if type(reply) is not dict:
            raise _Failure("failed: a reply that is not an object")
        if "error" in reply:
            error = str(reply["error"])
            raise _Failure("memory" if error.startswith("MemoryError") else f"failed: {error[:200]}")
        return reply

    def _ended(self) -> str:
        try:
            code = self.proc.wait(timeout=max(0.1, min(1.0, self.deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            return "timeout"
        if code in (-signal.SIGKILL, -signal.SIGXCPU, 128 + signal.SIGKILL, 128 + signal.SIGXCPU):
            return "timeout"
        return f"failed: the program ended before its tests ran (exit status {code})"

    def close(self) -> None:
        """Kill the runner and everything it started; never wait on its pipes."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pipe in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                pipe.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self.stderr.close()
        if self.scratch is not None:
            self.scratch.cleanup()


class _Candidate:
    """Stands for the completion's function in the problem's tests: each call is a request to the
    sandbox, each result a decoded plain value. The first failure sticks, so a test that catches
    exceptions cannot turn a failed call into a pass."""

    def __init__(self, box: _Box):
        self.box, self.failure = box, None

    def __call__(self, *args, **kwargs):
        if self.failure is None:
            try:
                self.box.send({"args": plain_values.encode(args), "kwargs": plain_values.encode(kwargs)})
                reply = self.box.receive()
                if "ok" not in reply:
                    raise _Failure("failed: a reply without a value")
                try:
                    return plain_values.decode(reply["ok"])
                except (ValueError, TypeError, RecursionError) as exc:
                    raise _Failure(f"failed: not a plain value ({str(exc)[:100]})") from None
            except _Failure as failure:
                self.failure = str(failure)
        raise _Failure(self.failure)


def run_tests(
    prompt: str, completion: str, test: str, entry_point: str, timeout: float = 5.0, limits: Limits = Limits(),
    unsafe: bool = False,
) -> Outcome:  # fmt: skip
    """Define prompt + completion in the sandbox and run `test`'s `check(candidate)` here against it.

    `prompt` and `test` are the problem's own trusted code; only `completion` is untrusted."""
    if not unsafe:
        check_available()
    tests: dict = {"__name__": "kiln_humaneval_tests"}
    exec(compile(f"{prompt}\n\n{test}\n", "<tests>", "exec"), tests)
    box = _Box(timeout, limits, unsafe)
    candidate = _Candidate(box)
    tests[entry_point] = candidate  # some tests call the function by its name (HumanEval/33)
    try:
        box.send({"source": f"{prompt}{completion}\n", "entry": entry_point})
        box.receive()  # {"ready": true}: the program is defined
        tests["check"](candidate)
    except _Failure as failure:
        return Outcome(False, str(failure))
    except Exception as exc:  # the problem's own assertion (or its test code) failed on the values
        return Outcome(False, candidate.failure or f"failed: {type(exc).__name__}: {str(exc)[:150]}".rstrip(": "))
    finally:
        box.close()
    if candidate.failure:
        return Outcome(False, candidate.failure)
    return Outcome(True, "passed")
