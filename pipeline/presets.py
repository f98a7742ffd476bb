"""Sampler presets: `presets/*.yaml` in the checkout, then a registered version's `presets.json`.

A preset fixes temperature, top_k, top_p, min_p, repeat_penalty, the context size and the default
number of new tokens; a request may override the sampler values it sends. A version's
`presets.json` (`{"name": {field: value}}`) overrides or adds presets for that version only.
`default` always exists.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from pipeline.errors import KilnError
from pipeline.layout import PRESETS_DIR

DEFAULT = "default"


@dataclass(frozen=True)
class Preset:
    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    context_size: int = 2048
    max_tokens: int = 256

    def __post_init__(self):
        checks = {
            "temperature": self.temperature >= 0,
            "top_k": self.top_k >= 0,
            "top_p": 0 < self.top_p <= 1,
            "min_p": 0 <= self.min_p <= 1,
            "repeat_penalty": self.repeat_penalty > 0,
            "context_size": self.context_size >= 16,
            "max_tokens": 1 <= self.max_tokens <= self.context_size,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"{bad[0]}={getattr(self, bad[0])!r} is out of range")

    def sampler(self) -> dict:
        """llama-server's own names for the sampler fields."""
        return {
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "min_p": self.min_p,
            "repeat_penalty": self.repeat_penalty,
        }

    def as_dict(self) -> dict:
        return asdict(self)


def _parse(data, where: str) -> Preset:
    if not isinstance(data, dict):
        raise KilnError(f"{where}: a preset is a mapping of {', '.join(f.name for f in fields(Preset))}")
    known = {f.name for f in fields(Preset)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise KilnError(f"{where}: unknown preset field {unknown[0]!r} (known: {', '.join(sorted(known))})")
    try:
        return Preset(**data)
    except (TypeError, ValueError) as exc:
        raise KilnError(f"{where}: {exc}") from None


def load_presets(folder: Path = PRESETS_DIR, version_file: Path | None = None) -> dict[str, Preset]:
    """Every preset by name: the YAML folder, then the version's presets.json on top."""
    presets: dict[str, Preset] = {DEFAULT: Preset()}
    for path in sorted(Path(folder).glob("*.yaml")) if Path(folder).is_dir() else []:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise KilnError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        presets[path.stem] = _parse(data, str(path))
    if version_file is not None and Path(version_file).is_file():
        try:
            data = json.loads(Path(version_file).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise KilnError(f"{version_file}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise KilnError(f"{version_file}: expected an object from preset name to preset")
        for name, values in data.items():
            presets[name] = _parse(values, f"{version_file}: preset {name!r}")
    return presets
