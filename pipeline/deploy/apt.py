"""Installing a Debian package the deployment needs, when it is missing and this is root (as the Makefile's
targets do), keeping apt's own last words so that a failed install says why."""

from __future__ import annotations

import os
import shutil
import subprocess


def apt_install(package: str, recommends: bool = True) -> str:
    """Install `package` with apt-get (updating the lists once if the first try fails). "" when it went
    well or could not be tried (not root, no apt-get); else apt's last lines (a missing package, no
    network, a held lock)."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return ""
    install = ["apt-get", "install", "-y", *([] if recommends else ["--no-install-recommends"]), package]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    done = subprocess.run(install, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        done = subprocess.run(install, env=env, capture_output=True, text=True)
    return " ".join((done.stderr or done.stdout).strip().splitlines()[-3:]) if done.returncode else ""
