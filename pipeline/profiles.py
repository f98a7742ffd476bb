"""Profiles: one named set of every size in the pipeline, as data.

`tiny` (the default) runs the whole pipeline in minutes on a 2-core CPU, `small` is a stronger
CPU run of about an hour, `300m` is the full size meant for a GPU. A profile is a tree of
dataclasses; each stage reads only its own section. A user's YAML file names a base profile
and overrides any field:

    base: tiny
    corpus:
      sources:
        - {path: /data/my_code}
        - {path: /data/notes.jsonl, text_field: body}
      max_bytes: 20_000_000
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import KilnError
from pipeline.ingest import Source


class ProfileError(KilnError):
    """A profile name, file or field that is not valid: the message names it."""


@dataclass
class CorpusSettings:
    """raw_corpus: what to read and how much."""

    sources: list[Source] = field(
        default_factory=lambda: [
            Source(builtin="python_stdlib"),
            Source(builtin="python_docs"),
            Source(builtin="python_docstrings"),
        ]
    )
    """Where the text comes from (files, folders, HF datasets, builtins); see `pipeline.ingest.Source`."""
    code_share: float | None = 0.6
    """Share of bytes that is code (the rest prose); None keeps every document of every source."""
    max_bytes: int | None = 4_000_000
    """Bytes of text to take in all; None takes everything the sources hold."""
    max_doc_chars: int = 32_000
    """Longer files are split at blank lines into documents of at most about this many characters."""
    seed: int = 0
    """Seed for the order in which files of a folder are sampled."""

    def __post_init__(self) -> None:
        self.sources = [s if isinstance(s, Source) else Source(**s) for s in self.sources]
        if not self.sources:
            raise ProfileError("corpus.sources: at least one source is needed")
        if self.code_share is not None and not 0 <= self.code_share <= 1:
            raise ProfileError(f"corpus.code_share must be in [0, 1], not {self.code_share}")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise ProfileError(f"corpus.max_bytes must be positive, not {self.max_bytes}")


@dataclass
class CleanSettings:
    """clean_corpus: dedup thresholds, sampling and the split."""

    minhash_threshold: float = 0.8
    """Jaccard similarity above which two documents count as near duplicates."""
    minhash_ngrams: int = 5
    """Words per shingle for MinHash."""
    minhash_hashes: int = 112
    """Hash functions per signature; split into bands to match `minhash_threshold`."""
    short_doc_chars: int = 200
    """Documents shorter than this are sampled down (they carry little to learn from)."""
    short_doc_keep: float = 0.5
    """Share of short documents kept (chosen by a hash of the id, so the same every run)."""
    validation_share: float = 0.05
    """Share of clean documents held out for validation, from every training stage."""
    tasks: int = 1
    """datatrove tasks (and local worker processes); more splits the work for several cores."""

    def __post_init__(self) -> None:
        if not 0.0 < self.minhash_threshold < 1.0:
            raise ProfileError(f"clean.minhash_threshold must be in (0, 1), not {self.minhash_threshold}")
        if not 0.0 <= self.short_doc_keep <= 1.0:
            raise ProfileError(f"clean.short_doc_keep must be in [0, 1], not {self.short_doc_keep}")
        if not 0.0 < self.validation_share < 0.5:
            raise ProfileError(f"clean.validation_share must be in (0, 0.5), not {self.validation_share}")
        if self.minhash_hashes < 8 or self.minhash_ngrams < 1 or self.tasks < 1:
            raise ProfileError("clean.minhash_hashes must be >= 8, minhash_ngrams and tasks >= 1")


@dataclass
class Profile:
    """Every size of one pipeline run."""

    name: str
    corpus: CorpusSettings = field(default_factory=CorpusSettings)
    clean: CleanSettings = field(default_factory=CleanSettings)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _builtin_profiles() -> dict[str, Profile]:
    return {
        "tiny": Profile("tiny"),
        "small": Profile(
            "small",
            corpus=CorpusSettings(
                max_bytes=40_000_000,
            ),
            clean=CleanSettings(tasks=2),
        ),
        "300m": Profile(
            "300m",
            corpus=CorpusSettings(
                sources=[
                    Source(builtin="python_stdlib"),
                    Source(builtin="site_packages"),
                    Source(builtin="python_docs"),
                    Source(builtin="python_docstrings"),
                ],
                max_bytes=None,
            ),
            clean=CleanSettings(tasks=os.cpu_count() or 1),
        ),
    }


PROFILE_NAMES = tuple(_builtin_profiles())
DEFAULT_PROFILE = "tiny"


def _override(obj: Any, values: dict, where: str) -> Any:
    """A copy of dataclass `obj` with `values` applied, recursing into nested sections."""
    if not isinstance(values, dict):
        raise ProfileError(f"{where}: expected a mapping, got {type(values).__name__}")
    names = {f.name: f for f in dataclasses.fields(obj)}
    changes = {}
    for key, value in values.items():
        if key not in names:
            raise ProfileError(f"{where}.{key}: unknown setting (known: {', '.join(names)})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[key] = _override(current, value, f"{where}.{key}")
        else:
            changes[key] = value
    try:
        return dataclasses.replace(obj, **changes)
    except (TypeError, ValueError) as exc:
        raise ProfileError(f"{where}: {exc}") from None


def load_profile(name_or_path: str | os.PathLike | None = None) -> Profile:
    """A built-in profile by name, or a YAML file that starts from one (`base:`) and overrides it.

    With no argument, the profile named by the KILN_PROFILE environment variable, else tiny.
    """
    name_or_path = name_or_path or os.environ.get("KILN_PROFILE") or DEFAULT_PROFILE
    builtins = _builtin_profiles()
    if str(name_or_path) in builtins:
        return builtins[str(name_or_path)]
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        raise ProfileError(f"unknown profile {str(name_or_path)!r}: choose {', '.join(builtins)} or a .yaml file")
    if not path.is_file():
        raise ProfileError(f"{path}: profile file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    base = data.pop("base", DEFAULT_PROFILE)
    if base not in builtins:
        raise ProfileError(f"{path}: base {base!r} is not a profile ({', '.join(builtins)})")
    data.setdefault("name", path.stem)
    try:
        return _override(builtins[base], data, path.name)
    except ValueError as exc:  # a section's __post_init__ names the field
        raise ProfileError(f"{path}: {exc}") from None
