"""A source of the corpus, as a profile names it (`corpus.sources`) and raw_corpus reads it.

It lives in the core, below both the profile schema (`pipeline.config`) and the stage that reads
it (`pipeline.data.ingest`), so that each may import it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.errors import KilnError

BUILTINS = ("python_stdlib", "python_docs", "python_docstrings", "site_packages", "korean_prose")


class IngestError(KilnError):
    """A source that cannot be read as asked: the message names the file or setting."""


@dataclass
class Source:
    """One input of the corpus. Exactly one of `path`, `builtin` and `hf_dataset` is set."""

    path: str | None = None
    """A file or a folder (searched recursively) of text, code, JSONL or Parquet files."""
    builtin: str | None = None
    """Real text on every machine: python_stdlib (code), python_docs (Python's reference
    documentation in pydoc_data), python_docstrings (the stdlib's docstrings, prose),
    site_packages (the source of the installed Python packages, code), korean_prose (the
    Constitution of the Republic of Korea and ten National Assembly bills, from the konlpy
    package's data; prose, lang `ko`)."""
    hf_dataset: str | None = None
    """A Hugging Face dataset name or local dataset folder, loaded with `datasets.load_dataset`."""
    hf_config: str | None = None
    """The dataset's configuration name, if it has several."""
    split: str = "train"
    """The dataset split to read."""
    text_field: str = "text"
    """The field holding the text in JSONL, Parquet and dataset records."""
    kind: str = "auto"
    """code, prose, or auto (code when the file's suffix is a programming language)."""

    def __post_init__(self) -> None:
        chosen = [n for n in ("path", "builtin", "hf_dataset") if getattr(self, n)]
        if len(chosen) != 1:
            raise IngestError(f"a source needs exactly one of path, builtin, hf_dataset; got {chosen or 'none'}")
        if self.builtin and self.builtin not in BUILTINS:
            raise IngestError(f"unknown builtin source {self.builtin!r}; choose from {', '.join(BUILTINS)}")
        if self.kind not in ("auto", "code", "prose"):
            raise IngestError(f"source kind must be auto, code or prose, not {self.kind!r}")

    @property
    def label(self) -> str:
        return self.path or self.builtin or f"hf:{self.hf_dataset}"


# A builtin source made from another's files: its documents split with the file they came from.
DERIVED_FROM = {"python_docstrings": "python_stdlib"}
# A package copied inside another (pip/_vendor/requests/...): one package, wherever it is installed.
_VENDORED = re.compile(r"(?:^|/)(?:_vendor|vendor|_vendored|vendored|extern|_extern)/")


def origin_file(doc_id: str) -> str:
    """The file a document was made from, as the train/validation split keys it: the chunks of one
    file (`id#1`), a repeated id (`id~hash`), the docstrings of a stdlib module
    (`python_docstrings:X` comes from `python_stdlib:X`) and a vendored copy of a package in
    site-packages (`site_packages:pip/_vendor/requests/api.py` is `site_packages:requests/api.py`)
    all have one origin, so they land on one side of the split."""
    base = re.split(r"[#~]", doc_id, maxsplit=1)[0]
    source, colon, rel = base.partition(":")
    if not colon:
        return base
    source = DERIVED_FROM.get(source, source)
    if source == "site_packages":
        rel = _VENDORED.split(rel)[-1]
    return f"{source}:{rel}"
