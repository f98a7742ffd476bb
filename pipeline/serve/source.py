"""Where the served GGUF comes from: a registered version (resolved, pulled, sha256-verified) or a local file.

A pulled version is kept in `<cache>/serve/<registry>/kiln-<profile>/<version>/` so that a
restart or a rollback to it does not download again; it is used only after its GGUF matches the
version's sha256 tag once more. `<registry>` is a hash of the tracking URI: two registries both
hold a `kiln-tiny` version 1, with different files.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import KilnError
from pipeline.io import atomic_path
from pipeline.layout import cache_dir
from pipeline.presets import Preset, load_presets
from pipeline.release import registry


@dataclass(frozen=True)
class ModelSource:
    """One servable model: the GGUF file, its version and where it came from, its presets."""

    name: str
    version: str
    gguf: Path
    sha256: str
    presets: dict[str, Preset] = field(default_factory=dict)
    alias: str | None = None

    @property
    def label(self) -> str:
        return f"{self.name}:{self.version}"


def from_file(path: Path, presets_dir: Path | None = None) -> ModelSource:
    """A local GGUF, served as version `local` (no registry)."""
    path = Path(path)
    if not path.is_file():
        raise KilnError(f"{path}: GGUF file not found")
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise KilnError(f"{path}: not a GGUF file")
    kwargs = {"folder": presets_dir} if presets_dir else {}
    return ModelSource(path.stem, "local", path, registry.sha256(path), load_presets(**kwargs))


def resolve(uri: str, profile: str, alias_or_version: str) -> str:
    """The version number the alias names now (the poll compares it with what is served)."""
    return registry.resolve(uri, profile, alias_or_version)[0]


def pull(uri: str, profile: str, alias_or_version: str, quant: str, presets_dir: Path | None = None) -> ModelSource:
    """Resolve, download once into the cache, verify the GGUF's sha256 against its tag."""
    version, tags = registry.resolve(uri, profile, alias_or_version)
    name = registry.model_name(profile)
    where = f"{name} version {version}"
    tagged = sorted(k.removeprefix("sha256.") for k in tags if k.startswith("sha256.") and k.endswith(f"-{quant}.gguf"))
    if not tagged:
        raise KilnError(f"{where} has no {quant} GGUF file with a sha256 tag")
    rel, expected = tagged[0], tags[f"sha256.{tagged[0]}"]
    registry_key = hashlib.sha256(uri.encode()).hexdigest()[:12]
    folder = cache_dir() / "serve" / registry_key / name / version
    if not folder.is_dir():
        with atomic_path(folder) as tmp:
            tmp.mkdir(parents=True)
            registry.verify(uri, profile, version, tmp)  # every file of the version, against its tag
    found = [p for p in folder.rglob(Path(rel).name) if p.as_posix().endswith(rel)]
    if not found:
        raise KilnError(f"{where}: {rel} is missing from the pulled files in {folder}")
    gguf = found[0]
    actual = registry.sha256(gguf)
    if actual != expected:
        shutil.rmtree(folder, ignore_errors=True)  # a changed cache copy is pulled again next time
        raise KilnError(f"{where}: the cached {rel} does not match its sha256 tag")
    kwargs = {"folder": presets_dir} if presets_dir else {}
    presets = load_presets(version_file=next(iter(sorted(folder.rglob("presets.json"))), None), **kwargs)
    alias = None if alias_or_version.isdigit() else alias_or_version
    return ModelSource(name, version, gguf, actual, presets, alias)
