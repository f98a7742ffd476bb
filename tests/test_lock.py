"""requirements.lock is what `make` installs: every dependency of pyproject.toml (and its test extra)
pinned to one version with its hashes. A dependency added to pyproject.toml without `make lock`, or an
environment that drifted from the lock, fails here by name."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"


def locked() -> dict[str, tuple[Version, list[str]]]:
    """name -> (pinned version, its sha256 hashes), from the lock's `name==version \\ --hash=...` entries."""
    entries = {}
    text = LOCK.read_text(encoding="utf-8").replace("\\\n", " ")
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        pin = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line)
        assert pin, f"requirements.lock: {line[:80]!r} is not a pinned requirement"
        entries[canonicalize_name(pin[1])] = (Version(pin[2]), re.findall(r"--hash=sha256:([0-9a-f]{64})", line))
    return entries


def declared() -> list[Requirement]:
    """The dependencies and the test extra, with the extras it takes from kiln itself (`kiln[ray]`) expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    todo, found = [*project["dependencies"], *extras["test"]], []
    while todo:
        req = Requirement(todo.pop())
        if canonicalize_name(req.name) == canonicalize_name(project["name"]):
            todo += [r for extra in req.extras for r in extras[extra]]
        else:
            found.append(req)
    return found


def test_every_declared_dependency_is_locked_within_its_range():
    pins = locked()
    for req in declared():
        if req.marker and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is in pyproject.toml but not in requirements.lock: run make lock"
        assert req.specifier.contains(pins[name][0], prereleases=True), (
            f"requirements.lock pins {req.name}=={pins[name][0]}, outside pyproject.toml's {req}: run make lock"
        )


def test_every_pin_has_a_hash():
    unhashed = [name for name, (_, hashes) in locked().items() if not hashes]
    assert not unhashed, f"requirements.lock: no --hash for {', '.join(unhashed)}: run make lock"


def test_the_environment_is_the_locked_one():
    drifted = []
    for name, (version, _) in locked().items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            drifted.append(f"{name} (locked {version}, not installed)")
            continue
        if installed != version:
            drifted.append(f"{name} (locked {version}, installed {installed})")
    assert not drifted, "the environment differs from requirements.lock (make reinstalls it): " + ", ".join(drifted)
