"""A Python child process for a test whose failure would be a hang: its own session, killed with
everything it started when its deadline passes, so a hung child fails the test instead of the run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from pipeline.layout import REPO_ROOT


def run_python(script: str, *args: str, timeout: float, hung: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python -c script args...` run from the checkout; past `timeout`
    seconds the child's process group is killed and the test fails with `hung`."""
    child = subprocess.Popen(
        [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=REPO_ROOT, start_new_session=True,
    )  # fmt: skip
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # what it started too: the group it leads
        child.communicate()
        pytest.fail(hung)
    return child.returncode, out, err
