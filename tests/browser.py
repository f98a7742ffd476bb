"""Debian's chromium for the browser tests: its path, installed with apt when missing and this is root
(as `make browser` does); a failure saying why otherwise."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def chromium() -> str:
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0:
        pytest.fail("chromium is missing and this is not root: sudo apt-get install chromium (or make browser)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for step in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        done = subprocess.run(step, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(step)} failed: {(done.stderr or done.stdout).strip()[-500:]}")
    return shutil.which("chromium") or pytest.fail("chromium could not be installed")
