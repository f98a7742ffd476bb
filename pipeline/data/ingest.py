"""raw_corpus: read every source into one normalized JSONL (`id`, `text`, `source`, `lang`).

Sources are plain text files, JSONL, Parquet, folders of any of these, Hugging Face datasets
by name, and built-in real text found on every machine (the Python standard library's source,
Python's reference documentation, and the Korean legal prose the konlpy package ships). Code
and prose are mixed by a byte ratio.

Nothing is dropped here. A row that cannot become a document (bytes that are not UTF-8, a
malformed JSON line, a record without the text field) is still written, with an `error` field
naming the problem; the cleaning stage then rejects it with that reason, so it is counted and
kept aside like every other rejection. Problems with the request itself (a missing path, a
file where no record has the text field, a dataset that cannot be loaded) raise `IngestError`.
"""

from __future__ import annotations

import ast
import collections
import contextlib
import hashlib
import importlib.util
import json
import os
import random
import re
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from pipeline.io import atomic_path
from pipeline.sources import IngestError, Source

CODE_SUFFIXES = {
    ".py": "python", ".pyi": "python", ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp",
    ".hpp": "cpp", ".rs": "rust", ".go": "go", ".java": "java", ".js": "javascript",
    ".ts": "typescript", ".sh": "shell", ".rb": "ruby", ".kt": "kotlin", ".swift": "swift",
    ".scala": "scala", ".lua": "lua", ".sql": "sql", ".r": "r", ".jl": "julia",
}  # fmt: skip
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ""}
JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}


@dataclass
class IngestStats:
    documents: int = 0
    bytes: int = 0
    by_kind: dict = field(default_factory=dict)  # kind -> {"documents", "bytes"}
    by_lang: dict = field(default_factory=dict)  # lang -> {"documents", "bytes"}, after the mix
    by_source: dict = field(default_factory=dict)  # source label -> documents
    errors: dict = field(default_factory=dict)  # error -> rows carried to the cleaner


def guess_lang(text: str, suffix: str = "") -> str:
    """A programming language from the suffix, else 'ko' or 'en' from the script of the letters."""
    if suffix.lower() in CODE_SUFFIXES:
        return CODE_SUFFIXES[suffix.lower()]
    letters = [c for c in text[:4000] if c.isalpha()]
    if not letters:
        return "unknown"
    hangul = sum("\uac00" <= c <= "\ud7a3" or "\u3131" <= c <= "\u318e" for c in letters)
    if hangul / len(letters) > 0.3:
        return "ko"
    latin = sum(c.isascii() for c in letters)
    return "en" if latin / len(letters) > 0.7 else "other"


def is_code(lang: str) -> bool:
    return lang in CODE_SUFFIXES.values()


def split_long(text: str, max_chars: int) -> list[str]:
    """Split text longer than `max_chars` at blank lines (paragraph or top-level block ends)."""
    if len(text) <= max_chars:
        return [text]
    chunks, current, size = [], [], 0
    for block in text.split("\n\n"):
        if size + len(block) > max_chars and current:
            chunks.append("\n\n".join(current))
            current, size = [], 0
        current.append(block)
        size += len(block) + 2
    chunks.append("\n\n".join(current))
    return chunks


def _make_row(doc_id: str, text: str, source: str, lang: str, error: str | None = None) -> dict:
    rec = {"id": doc_id, "text": text, "source": source, "lang": lang}
    if error:
        rec["error"] = error
    return rec


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _read_text_file(path: Path, doc_id: str, source: str, max_chars: int) -> Iterator[dict]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise IngestError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        # Kept (decoded with replacement characters) so the rejection shows what was there.
        where = f"byte {exc.start}"
        yield _make_row(doc_id, raw.decode("utf-8", "replace"), source, "unknown", f"not_utf8 ({where})")
        return
    lang = guess_lang(text, path.suffix)
    for i, chunk in enumerate(split_long(text, max_chars)):
        yield _make_row(f"{doc_id}#{i}" if i else doc_id, chunk, source, lang)


def _read_jsonl(path: Path, src: Source, max_chars: int, name: str) -> Iterator[dict]:
    label, seen_text = str(path), False
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            doc_id = f"{name}:{lineno}"
            if not raw.strip():
                continue  # blank lines separate nothing in JSONL
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield _make_row(doc_id, raw.decode("utf-8", "replace"), label, "unknown", "not_utf8")
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield _make_row(doc_id, line.rstrip("\n"), label, "unknown", f"malformed_json ({exc.msg})")
                continue
            text = row.get(src.text_field) if isinstance(row, dict) else None
            if not isinstance(text, str):
                yield _make_row(doc_id, line.rstrip("\n"), label, "unknown", f"missing_text_field ({src.text_field})")
                continue
            seen_text = True
            lang = row.get("lang") if isinstance(row.get("lang"), str) else guess_lang(text)
            base = str(row.get("id", doc_id))
            for i, chunk in enumerate(split_long(text, max_chars)):
                yield _make_row(f"{base}#{i}" if i else base, chunk, label, lang)
    if not seen_text and path.stat().st_size > 0:
        raise IngestError(f"{path}: no record has a string field {src.text_field!r} (set text_field)")


def _read_parquet(path: Path, src: Source, max_chars: int, name: str) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise IngestError(f"{path}: not a readable Parquet file ({exc})") from None
    if src.text_field not in table.schema_arrow.names:
        raise IngestError(f"{path}: no column {src.text_field!r} (columns: {', '.join(table.schema_arrow.names)})")
    row_no = 0
    for batch in _parquet_batches(path, table):
        for row in batch.to_pylist():
            row_no += 1
            text, doc_id = row.get(src.text_field), f"{name}:{row_no}"
            if not isinstance(text, str):
                yield _make_row(doc_id, "", str(path), "unknown", f"missing_text_field ({src.text_field})")
                continue
            base = str(row.get("id", doc_id))
            for i, chunk in enumerate(split_long(text, max_chars)):
                yield _make_row(f"{base}#{i}" if i else base, chunk, str(path), guess_lang(text))


def _parquet_batches(path: Path, table):
    """The file's record batches; a corrupt page or row group is one line naming the file."""
    batches = table.iter_batches(batch_size=1024)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as exc:  # pyarrow raises OSError, ArrowInvalid... for damaged data
            raise IngestError(f"{path}: a damaged Parquet data page ({str(exc).splitlines()[0][:150]})") from None
        yield batch


def _files_under(folder: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        files += [Path(root, n) for n in sorted(names) if not n.startswith(".")]
    return files


def _read_path(path: Path, src: Source, max_chars: int, rng: random.Random) -> Iterator[dict]:
    if not path.exists():
        raise IngestError(f"{path}: no such file or folder")
    files = _files_under(path) if path.is_dir() else [path]
    # Ids name a file from the source's own folder name down (`src/a/b.py`), never by where the
    # checkout lies: the train/validation split hashes the id, and must not move with the clone.
    top = path.absolute().parent
    if path.is_dir():
        rng.shuffle(files)  # a budget then takes a fair sample, not the alphabet's first letters
    for f in files:
        if not f.exists():  # pathlib says False for a dangling or looping link
            raise IngestError(f"{f}: a symbolic link that leads nowhere (dangling or looping)")
        suffix, name = f.suffix.lower(), f.absolute().relative_to(top).as_posix()
        if suffix in JSONL_SUFFIXES:
            yield from _read_jsonl(f, src, max_chars, name)
        elif suffix in PARQUET_SUFFIXES:
            yield from _read_parquet(f, src, max_chars, name)
        elif suffix in CODE_SUFFIXES or suffix in TEXT_SUFFIXES or not path.is_dir():
            yield from _read_text_file(f, name, str(f), max_chars)
        # Other files inside a folder (images, archives, compiled files) are not text sources.


def _read_builtin(name: str, max_chars: int, rng: random.Random) -> Iterator[dict]:
    if name == "korean_prose":
        yield from _korean_prose(max_chars)
        return
    stdlib = _stdlib_dir()
    if name == "python_docs":
        from pydoc_data.topics import topics

        for topic in sorted(topics):
            yield _make_row(f"python_docs:{topic}", topics[topic].strip(), "python_docs", "en")
        return
    if name == "site_packages":
        roots = sorted({Path(p) for p in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"])})
    else:
        roots = [stdlib]
    files = []
    for root in roots:
        files += [
            (root, f) for f in _files_under(root)
            if f.suffix == ".py" and (name == "site_packages" or "site-packages" not in f.parts)
            and "pydoc_data" not in f.parts  # the docs source already carries that text
        ]  # fmt: skip
    rng.shuffle(files)
    for root, f in files:
        rel = f.relative_to(root).as_posix()  # not where the environment lies: the split hashes ids
        if name == "python_docstrings":
            yield from _docstrings(f, f"python_docstrings:{rel}", max_chars)
        else:
            yield from _read_text_file(f, f"{name}:{rel}", name, max_chars)


def _docstrings(path: Path, doc_id: str, max_chars: int) -> Iterator[dict]:
    """The module's, classes' and functions' docstrings of one file, as one prose document."""
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):
        return  # the stdlib ships a few deliberately broken test files; they hold no docs
    docs = [d for n in definitions_in(tree) if (d := ast.get_docstring(n)) and len(d) > 80]
    if docs:
        for i, chunk in enumerate(split_long("\n\n".join(docs), max_chars)):
            yield _make_row(f"{doc_id}#{i}" if i else doc_id, chunk, "python_docstrings", "en")


_DEFINITION = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
# The fields that hold statements, in the order every node type lists them (If: body, orelse;
# Try: body, handlers, orelse, finalbody; Match: cases).
_STATEMENT_LISTS = ("body", "handlers", "orelse", "finalbody", "cases")


def definitions_in(tree: ast.Module) -> list:
    """The module and its classes and functions, in `ast.walk`'s order (breadth first, fields in
    order). Definitions are statements, and statements sit only in the lists of other statements
    and of except and case clauses, so the walk never enters an expression: `ast.walk` spent most
    of the docstring source's time visiting them."""
    found, queue = [tree], collections.deque([tree])
    while queue:
        node = queue.popleft()
        for name in _STATEMENT_LISTS:
            children = getattr(node, name, None)
            if isinstance(children, list):  # a lambda's body is one expression
                queue.extend(children)
                found += [c for c in children if isinstance(c, _DEFINITION)]
    return found


# A chapter heading of the Constitution ("제3장 국회") or its addenda ("부칙 <헌법 제10호, ...>").
_CHAPTER = re.compile(r"^[ \t]*(?:제\d+장 |(?:펼침[ \t]+)?부칙)", re.MULTILINE)
# A chapter shorter than this many words joins the next one: alone it would fail the prose
# quality floor of 50 words (the chapter on local autonomy is two articles).
KOREAN_MIN_WORDS = 100


def konlpy_corpus_dir() -> Path:
    """The folder of konlpy's bundled corpora. Found without importing konlpy, whose import
    starts looking for Java; the text files need none."""
    spec = importlib.util.find_spec("konlpy")
    folder = Path(next(iter(spec.submodule_search_locations)), "data", "corpus") if spec else None
    if folder is None or not folder.is_dir():
        raise IngestError("builtin korean_prose needs the konlpy package, which ships the text (pip install konlpy)")
    return folder


def _constitution_chapters(text: str) -> list[tuple[str, str]]:
    """(name, text) of the preamble, each chapter and the addenda; a short one joins the next."""
    starts = [0] + [m.start() for m in _CHAPTER.finditer(text)] + [len(text)]
    pieces = [text[a:b].strip() for a, b in zip(starts, starts[1:], strict=False)]
    chapters, pending, first = [], [], 0
    for i, piece in enumerate(pieces):
        if not pending:
            first = i
        pending.append(piece)
        if len(" ".join(pending).split()) >= KOREAN_MIN_WORDS or i == len(pieces) - 1:
            chapters.append((f"constitution/{first:02d}", "\n\n".join(p for p in pending if p)))
            pending = []
    return chapters


def _korean_prose(max_chars: int) -> Iterator[dict]:
    """The Constitution one chapter per document (a chapter is a topic: the National Assembly,
    the courts...), and each bill as one document. Every chapter is its own source document, so
    the train/validation split can hold Korean on both sides."""
    folder = konlpy_corpus_dir()
    docs = _constitution_chapters((folder / "kolaw" / "constitution.txt").read_text(encoding="utf-8"))
    docs += [(f"kobill/{f.stem}", f.read_text(encoding="utf-8")) for f in sorted((folder / "kobill").glob("*.txt"))]
    for name, text in docs:
        text = text.strip()
        for i, chunk in enumerate(split_long(text, max_chars) if text else []):
            doc_id = f"korean_prose:{name}"
            yield _make_row(f"{doc_id}#{i}" if i else doc_id, chunk, "korean_prose", "ko")


def _read_hf(src: Source, max_chars: int) -> Iterator[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(src.hf_dataset, src.hf_config, split=src.split, streaming=True)
        first = next(iter(ds), None)
    except Exception as exc:  # datasets raises many types for "cannot be found or loaded"
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise IngestError(f"hf dataset {src.hf_dataset!r}: cannot be loaded ({msg})") from None
    if first is not None and src.text_field not in first:
        raise IngestError(f"hf dataset {src.hf_dataset!r}: no field {src.text_field!r} (fields: {', '.join(first)})")
    for n, row in enumerate(ds):
        text = row.get(src.text_field)
        doc_id = f"hf:{src.hf_dataset}:{src.split}:{n}"
        if not isinstance(text, str):
            yield _make_row(doc_id, "", f"hf:{src.hf_dataset}", "unknown", f"missing_text_field ({src.text_field})")
            continue
        for i, chunk in enumerate(split_long(text, max_chars)):
            yield _make_row(f"{doc_id}#{i}" if i else doc_id, chunk, f"hf:{src.hf_dataset}", guess_lang(text))


def read_source(src: Source, max_chars: int = 32_000, seed: int = 0) -> Iterator[dict]:
    """Every record of one source, in a deterministic order."""
    rng = random.Random(f"{seed}:{src.label}")
    if src.builtin:
        records = _read_builtin(src.builtin, max_chars, rng)
    elif src.hf_dataset:
        records = _read_hf(src, max_chars)
    else:
        records = _read_path(Path(src.path), src, max_chars, rng)
    for rec in records:
        if src.kind != "auto" and "error" not in rec:
            rec["kind"] = src.kind
        yield rec


def _kind(rec: dict) -> str:
    return rec.pop("kind", None) or ("code" if is_code(rec["lang"]) else "prose")


def build_raw_corpus(
    sources: list[Source],
    output: Path,
    max_bytes: int | None = None,
    code_share: float | None = 0.6,
    max_doc_chars: int = 32_000,
    seed: int = 0,
    progress: bool = True,
) -> IngestStats:
    """Read `sources` into `output` (JSONL), mixing code and prose by `code_share` of bytes.

    With `max_bytes`, each kind gets its share of the budget. When one kind runs short, the
    other is cut so the ratio still holds: a profile that says 60% code gets 60% code. Sources
    fill their kind's share in the order given, so a small source listed first (korean_prose)
    is taken whole and a large one listed after it takes the rest.
    """
    if not sources:
        raise IngestError("no sources given")
    if code_share is not None and not 0.0 <= code_share <= 1.0:
        raise IngestError(f"code_share must be between 0 and 1, not {code_share}")
    stats = IngestStats()
    with tempfile.TemporaryDirectory(dir=output.parent if output.parent.exists() else None) as tmp:
        parts = {k: Path(tmp, f"{k}.jsonl") for k in ("code", "prose", "error")}
        bar = tqdm(desc="raw_corpus", unit="B", unit_scale=True, disable=not progress, total=max_bytes)
        sizes = _collect(sources, parts, max_bytes, code_share, max_doc_chars, seed, stats, bar)
        bar.close()
        _write_mix(parts, _ratio_limits(sizes, code_share), output, stats, sources)
    return stats


def _collect(
    sources: list[Source], parts: dict, max_bytes: int | None, code_share: float | None, max_doc_chars: int,
    seed: int, stats: IngestStats, bar: tqdm,
) -> dict:  # fmt: skip
    """Write every source's records into one file per kind (`parts`: code, prose, error) until the
    kind's share of `max_bytes` is full; count them by source and error in `stats`. Returns the
    bytes written per kind."""
    shares = {"code": code_share, "prose": None if code_share is None else 1.0 - code_share}
    budgets = {k: (None if max_bytes is None or s is None else s * max_bytes) for k, s in shares.items()}
    sizes = {k: 0 for k in parts}
    seen_ids: set[str] = set()
    with contextlib.ExitStack() as stack:
        handles = {k: stack.enter_context(p.open("w", encoding="utf-8")) for k, p in parts.items()}
        for src in sources:
            for rec in read_source(src, max_doc_chars, seed):
                kind = "error" if "error" in rec else _kind(rec)
                if shares.get(kind, 1) == 0.0:
                    continue  # a share of 0 asks for none of this kind
                budget = budgets.get(kind)
                if budget is not None and sizes[kind] >= budget:
                    if src.builtin or all(b is not None and sizes[k] >= b for k, b in budgets.items()):
                        break  # a builtin holds one kind only; or every kind is full
                    continue
                rec["id"] = _unique_id(rec["id"], seen_ids)
                handles[kind].write(json.dumps(rec, ensure_ascii=False) + "\n")
                nbytes = len(rec["text"].encode("utf-8"))
                sizes[kind] += nbytes
                _tally(stats, src, rec)
                bar.update(nbytes)
    return sizes


def _tally(stats: IngestStats, src: Source, rec: dict) -> None:
    """Count one written record by its source, and by its error when it carries one."""
    stats.by_source[src.label] = stats.by_source.get(src.label, 0) + 1
    if "error" in rec:
        reason = rec["error"].split(" ")[0]
        stats.errors[reason] = stats.errors.get(reason, 0) + 1


def _write_mix(parts: dict, limits: dict, output: Path, stats: IngestStats, sources: list[Source]) -> None:
    """Concatenate the per-kind files into `output`, each kind cut at its byte limit (at least one
    document of a kind is kept), and count documents and bytes per kind and language in `stats`."""
    with atomic_path(output) as tmp_out, tmp_out.open("w", encoding="utf-8") as out:
        for kind in ("code", "prose", "error"):
            taken_docs = taken_bytes = 0
            with parts[kind].open(encoding="utf-8", newline="\n") as fh:
                for line in fh:
                    rec = json.loads(line)
                    n = len(rec["text"].encode("utf-8"))
                    if limits.get(kind) is not None and taken_bytes + n > limits[kind] and taken_docs:
                        break
                    out.write(line)
                    taken_docs += 1
                    taken_bytes += n
                    if kind != "error":
                        lang = stats.by_lang.setdefault(rec["lang"], {"documents": 0, "bytes": 0})
                        lang["documents"] += 1
                        lang["bytes"] += n
            if kind != "error":
                stats.by_kind[kind] = {"documents": taken_docs, "bytes": taken_bytes}
            stats.documents += taken_docs
            stats.bytes += taken_bytes
        if stats.documents == 0:  # raised inside the block: no empty file is left behind
            raise IngestError(f"no documents in {', '.join(s.label for s in sources)}")


def _ratio_limits(sizes: dict, code_share: float | None) -> dict:
    """Byte limits per kind so that code:prose matches `code_share` with what was collected."""
    if code_share is None or code_share in (0.0, 1.0) or not sizes["code"] or not sizes["prose"]:
        return {}
    total = min(sizes["code"] / code_share, sizes["prose"] / (1 - code_share))
    return {"code": total * code_share, "prose": total * (1 - code_share)}


def _unique_id(doc_id: str, seen: set[str]) -> str:
    """Ids must be unique for dedup and the split; a repeated id gets its content hash appended."""
    if doc_id in seen:
        doc_id = f"{doc_id}~{hashlib.sha1(f'{doc_id}{len(seen)}'.encode()).hexdigest()[:8]}"
    seen.add(doc_id)
    return doc_id


def watched_files(sources: list[Source]) -> list[tuple[str, float]]:
    """(path, modification time) of every file under the profile's path sources: what the
    new-data sensor watches. Builtins and HF datasets are not watched."""
    found = []
    for src in sources:
        if not src.path or not Path(src.path).exists():
            continue
        root = Path(src.path)
        for f in _files_under(root) if root.is_dir() else [root]:
            found.append((str(f), f.stat().st_mtime))
    return sorted(found)


def data_fingerprint(files: list[tuple[str, float]]) -> str:
    """A run key from file names and modification times: the same files trigger once."""
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]
