"""A sandbox for model-written code: each program in its own process, contained.

Layers, outermost first:
- a fresh process in its own session (the whole group is killed at the wall-clock timeout);
- resource limits: address space (a memory bomb fails to allocate), CPU seconds, file size,
  open files, no core dumps;
- a throwaway working directory and a scrubbed environment (no inherited secrets or paths);
- guards installed inside the interpreter before the program runs: no new processes (fork,
  exec, system, spawn, subprocess), no sockets, no deleting, renaming or writing files outside
  the working directory.

The guards stop accidents and naive escapes from generated code; they are not a boundary
against a determined attacker (that needs a container or a VM), as with HumanEval's own harness.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

# Runs inside the sandboxed interpreter: install the guards, then exec the program.
_GUARD = r"""
import builtins, os, shutil, socket, subprocess, sys
_root = os.path.realpath(os.getcwd())
def _inside(path):
    try:
        return os.path.realpath(os.fspath(path)).startswith(_root + os.sep)
    except TypeError:
        return False  # a file descriptor: not a path we can check
def _blocked(what):
    def refuse(*args, **kwargs):
        raise PermissionError(f"sandbox: {what} is not allowed")
    return refuse
for name in ("fork", "forkpty", "system", "popen", "execv", "execve", "execvp", "execvpe", "execl", "execle",
             "execlp", "execlpe", "spawnv", "spawnve", "spawnl", "spawnle", "posix_spawn", "posix_spawnp",
             "kill", "killpg", "setuid", "chroot", "putenv", "_exit"):
    if hasattr(os, name):
        setattr(os, name, _blocked(f"os.{name}"))
subprocess.Popen = _blocked("subprocess")
socket.socket = _blocked("network access")
socket.create_connection = _blocked("network access")
def _guard_path(fn, what):
    def guarded(path, *args, **kwargs):
        if not _inside(path):
            raise PermissionError(f"sandbox: {what} outside the working directory")
        return fn(path, *args, **kwargs)
    return guarded
for name in ("remove", "unlink", "rmdir", "removedirs", "truncate", "chmod", "chown", "mkdir", "makedirs"):
    if hasattr(os, name):
        setattr(os, name, _guard_path(getattr(os, name), f"os.{name}"))
os.rename = _blocked("os.rename")
os.replace = _blocked("os.replace")
shutil.rmtree = _guard_path(shutil.rmtree, "shutil.rmtree")
shutil.move = _blocked("shutil.move")
_open = builtins.open
def _guarded_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and not _inside(file):
        raise PermissionError("sandbox: writing outside the working directory")
    return _open(file, mode, *args, **kwargs)
builtins.open = _guarded_open
del builtins, shutil, socket, subprocess
_source = sys.stdin.read()
_DONE = sys.argv[1]
exec(compile(_source, "<program>", "exec"), {"__name__": "__main__"})
sys.stderr.write("\n" + _DONE + "\n")  # reached only if the program ran to its end
"""
_DONE = "__kiln_sandbox_done__"


@dataclass
class Outcome:
    passed: bool
    reason: str  # "passed", "timeout", "memory", "failed: <last error line>"


def _limits(memory_mb: int, cpu_seconds: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb * 2**20, memory_mb * 2**20))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 2**20, 16 * 2**20))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_program(source: str, timeout: float = 5.0, memory_mb: int = 512) -> Outcome:
    """Run `source` in the sandbox; it passes when it exits 0 within the limits."""
    with tempfile.TemporaryDirectory(prefix="kiln-sandbox-") as work:
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _GUARD, _DONE],
            cwd=work, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True, preexec_fn=_limits(memory_mb, int(timeout) + 1),
        )  # fmt: skip
        try:
            _, err = proc.communicate(source.encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return Outcome(False, "timeout")
        text = err.decode("utf-8", "replace").strip().splitlines()
        if proc.returncode == 0 and text and text[-1] == _DONE:
            return Outcome(True, "passed")
        if proc.returncode == 0:
            return Outcome(False, "failed: exited before its tests ran")
        last = text[-1] if text else f"exit {proc.returncode}"
        if "MemoryError" in last:
            return Outcome(False, "memory")
        if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
            return Outcome(False, "timeout")
        return Outcome(False, f"failed: {last[:200]}")
