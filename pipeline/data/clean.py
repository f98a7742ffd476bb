"""clean_corpus: quality filters, exact and MinHash dedup, PII masking and the split, on datatrove.

The stage is a chain of datatrove pipelines, run by datatrove's local executor or on a Ray cluster
(`clean.executor`, pipeline/data/executors.py); Slurm takes the same steps through
docs/deploy/clean_slurm.py:

    A  read raw → ingest errors → quality rules → short-document sampling → write → exact-dedup signatures
    B  find exact duplicates
    C  read A → drop exact duplicates → write → MinHash signatures
    D  MinHash buckets          E  MinHash clusters
    F  read C → drop near duplicates → mask PII → tag train/validation → write clean/

Every filter has an exclusion writer, so each dropped document lands in `rejected/` with its
`reason`, and `stats.json` is counted from the files themselves: input = kept + dropped.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.utils.word_tokenizers import WordTokenizer
from tqdm import tqdm

from pipeline.config import CleanSettings
from pipeline.data.executors import MakeExecutor, datatrove_executor
from pipeline.data.pii import mask_pii
from pipeline.data.quality import quality_problem
from pipeline.io import atomic_path, read_jsonl, write_json
from pipeline.sources import origin_file


def minhash_bands(threshold: float, num_hashes: int) -> tuple[int, int]:
    """(bands, rows per band) with bands*rows <= num_hashes whose LSH S-curve best fits `threshold`.

    Two documents of Jaccard similarity s become candidates with probability 1-(1-s^r)^b. The
    pair minimising the area of false positives below the threshold plus false negatives above
    it is chosen (the same criterion as datasketch's MinHashLSH).
    """
    s_lo = np.linspace(0.0, threshold, 200)
    s_hi = np.linspace(threshold, 1.0, 200)
    best, best_err = (1, num_hashes), float("inf")
    for b in range(1, num_hashes + 1):
        for r in range(1, num_hashes // b + 1):
            fp = np.trapezoid(1 - (1 - s_lo**r) ** b, s_lo)
            fn = np.trapezoid((1 - s_hi**r) ** b, s_hi)
            if fp + fn < best_err:
                best, best_err = (b, r), fp + fn
    return best


def _split_of(doc_id: str, validation_share: float) -> str:
    """train or validation, from a hash of the id: stable across runs, machines and tasks."""
    h = int.from_bytes(hashlib.sha1(doc_id.encode("utf-8")).digest()[:8], "big") / 2**64
    return "validation" if h < validation_share else "train"


def _normalized(doc) -> str:
    """Text for exact dedup: whitespace runs collapsed, case kept (in code case matters)."""
    return " ".join(doc.text.split())


def _jsonl_row(writer, doc, reason: str | None = None) -> dict:
    """The JSONL record kiln writes for a document (bound to a datatrove writer as its adapter)."""
    meta = doc.metadata
    rec = {"id": doc.id, "text": doc.text, "source": meta.get("source"), "lang": meta.get("lang")}
    for key in ("split", "pii"):
        if key in meta:
            rec[key] = meta[key]
    if reason or "filter_reason" in meta:
        rec["reason"] = meta.get("filter_reason") or reason
    if reason:  # an exclusion writer: rejected documents keep no personal data either
        rec["text"] = mask_pii(doc.text)[0]
    return rec


class IngestErrorFilter(BaseFilter):
    """Drops rows the reader could not turn into documents (not UTF-8, malformed JSON...)."""

    name = "🧾 ingest errors"

    def filter(self, doc: Document):
        error = doc.metadata.get("error")
        return (False, error.split(" ")[0]) if error else True


class QualityFilter(BaseFilter):
    """Gopher rules for prose, Codex/StarCoder rules for code (see pipeline.data.quality)."""

    name = "🧪 quality"

    def filter(self, doc: Document):
        problem = quality_problem(doc.text, doc.metadata.get("lang", "unknown"))
        return (False, problem) if problem else True


class ShortDocSampler(BaseFilter):
    """Keeps a fixed share of short documents, chosen by a hash of the id."""

    name = "🎲 short-document sampling"

    def __init__(self, max_chars: int, keep: float, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.max_chars, self.keep = max_chars, keep

    def filter(self, doc: Document):
        if len(doc.text) >= self.max_chars:
            return True
        h = int.from_bytes(hashlib.sha1(f"sample:{doc.id}".encode()).digest()[:8], "big") / 2**64
        return True if h < self.keep else (False, "sampled_out_short")


class PiiMasker(PipelineStep):
    """Replaces personal data with placeholders; counts each kind."""

    name = "🔒 PII masking"
    type = "✂️ - FORMAT"

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            with self.track_time():
                doc.text, counts = mask_pii(doc.text)
            self.stat_update("total")
            for kind, n in counts.items():
                self.stat_update(f"pii_{kind}", value=n)
            if counts:
                doc.metadata["pii"] = dict(counts)
            yield doc


def source_document(doc_id: str) -> str:
    """The id of the file or record a document was cut from: ingest names the chunks of a long one
    `id`, `id#1`, `id#2`, ..., and everything before the first `#` is the same for all of them."""
    return doc_id.split("#", 1)[0]


class SplitTagger(PipelineStep):
    """Tags each document train or validation by the file it was made from (`origin_file`), so all
    chunks of one file, the docstrings of a module and the module itself, and vendored copies of one
    package land in one split: a file on both sides would leak into every held-out figure."""

    name = "✂️ train/validation split"
    type = "✂️ - FORMAT"

    def __init__(self, validation_share: float):
        super().__init__()
        self.validation_share = validation_share

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            doc.metadata["split"] = _split_of(origin_file(doc.id), self.validation_share)
            self.stat_update(doc.metadata["split"])
            yield doc


class CodeAwareWordTokenizer(WordTokenizer):
    """Words and single punctuation marks, in any script: fits code, English and Korean alike
    (datatrove's default English tokenizer would split code and Korean poorly)."""

    _pattern = re.compile(r"\w+|[^\w\s]")

    def word_tokenize(self, text: str) -> list[str]:
        return self._pattern.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [s for s in re.split(r"(?<=[.!?。])\s+|\n{2,}", text) if s.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in self._pattern.finditer(text)]


@dataclass
class CleanStats:
    input_documents: int
    kept_documents: int
    dropped: dict
    pii: dict
    splits: dict
    kept_bytes: int
    minhash_bands: list
    by_lang: dict  # lang -> {"documents", "bytes", "validation_documents"} of the kept documents

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def clean_corpus(raw_files: list[Path], output: Path, settings: CleanSettings, progress: bool = True) -> CleanStats:
    """Clean the JSONL `raw_files` into `output/clean/`, `output/rejected/` and `output/stats.json`
    (datatrove's logs and per-step stats in `output/logs/`).

    Outputs are built in a scratch folder inside `output` and moved into place at the end, so
    an interrupted run leaves the previous result untouched.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    scratch = output / ".clean-scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    work, rejected, clean = scratch / "work", scratch / "rejected", scratch / "clean"
    input_documents = _shard_inputs(raw_files, work / "raw", rejected, settings.tasks)
    bands, rows = minhash_bands(settings.minhash_threshold, settings.minhash_hashes)
    stages = _stages(settings, bands, rows, work, rejected, clean)
    with datatrove_executor(settings) as make_executor:  # clean.executor: local or a Ray cluster
        _run_stages(stages, work / "filtered", output / "logs", settings.tasks, progress, make_executor)
    if (rejected / "empty-00000.jsonl").stat().st_size == 0:
        (rejected / "empty-00000.jsonl").unlink()
    stats = _count(input_documents, clean, rejected, [bands, rows])
    write_json(scratch / "stats.json", stats.to_dict())
    _publish(scratch, output)
    return stats


def _rejects(rejected: Path, step: str):
    """The exclusion writer of one filter: its drops go to rejected/<step>-<rank>.jsonl with that reason."""
    from datatrove.pipeline.writers import JsonlWriter

    return JsonlWriter(
        str(rejected), output_filename=f"{step}-${{rank}}.jsonl", compression=None,
        adapter=functools.partial(_jsonl_row, reason=step),
    )  # fmt: skip


def _reader(folder: Path):
    from datatrove.pipeline.readers import JsonlReader

    return JsonlReader(str(folder), glob_pattern="*.jsonl", compression=None, file_progress=False)


def _writer(folder: Path, filename: str = "${rank}.jsonl"):
    from datatrove.pipeline.writers import JsonlWriter

    return JsonlWriter(str(folder), output_filename=filename, compression=None, adapter=_jsonl_row)


def _dedup_configs(ngrams: int, bands: int, rows: int) -> tuple:
    """datatrove's exact-dedup and MinHash configurations."""
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.utils.hashing import HashConfig

    # sha1 hashing: datatrove's xxhash path breaks with xxhash 4; sha1 has no such pin.
    hash_config = HashConfig(precision=64, hash_fc="sha1")
    exact = ExactDedupConfig(content_getter=_normalized, hash_config=hash_config)
    minhash = MinhashConfig(n_grams=ngrams, num_buckets=bands, hashes_per_bucket=rows, hash_config=hash_config)
    return exact, minhash


def _stages(settings: CleanSettings, bands: int, rows: int, work: Path, rejected: Path, clean: Path) -> list:
    """The datatrove pipelines A-F of the module docstring, in order: (name, tasks, steps)."""
    from datatrove.pipeline.dedup import (
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )

    exact, minhash = _dedup_configs(settings.minhash_ngrams, bands, rows)
    tasks, sigs, buckets = settings.tasks, str(work / "minhash_sigs"), str(work / "minhash_buckets")
    return [
        ("filter", tasks, [
            _reader(work / "raw"),
            IngestErrorFilter(exclusion_writer=_rejects(rejected, "ingest")),
            QualityFilter(exclusion_writer=_rejects(rejected, "quality")),
            ShortDocSampler(
                settings.short_doc_chars, settings.short_doc_keep, exclusion_writer=_rejects(rejected, "sampling")
            ),
            _writer(work / "filtered"),
            ExactDedupSignature(str(work / "exact_sigs"), config=exact),
        ]),
        ("exact_find", 1, [ExactFindDedups(str(work / "exact_sigs"), str(work / "exact_dups"), config=exact)]),
        ("exact_filter", tasks, [
            _reader(work / "filtered"),
            ExactDedupFilter(str(work / "exact_dups"), exact, exclusion_writer=_rejects(rejected, "exact_duplicate")),
            _writer(work / "deduped"),
            MinhashDedupSignature(sigs, config=minhash, language=CodeAwareWordTokenizer()),
        ]),
        ("minhash_buckets", bands, [MinhashDedupBuckets(sigs, buckets, config=minhash)]),
        ("minhash_cluster", 1, [MinhashDedupCluster(buckets, str(work / "minhash_remove"), config=minhash)]),
        ("final", tasks, [
            _reader(work / "deduped"),
            MinhashDedupFilter(str(work / "minhash_remove"), exclusion_writer=_rejects(rejected, "near_duplicate")),
            PiiMasker(),
            SplitTagger(settings.validation_share),
            _writer(clean, "${split}-${rank}.jsonl"),
        ]),
    ]  # fmt: skip


def _run_stages(
    stages: list, filtered: Path, logs: Path, workers: int, progress: bool, make_executor: MakeExecutor
) -> None:
    """Run each pipeline on the executor `make_executor` builds, at most `workers` tasks at a time;
    stop after the filter stage when nothing reached `filtered`.

    datatrove logs every task at INFO to stderr; its logs and per-step stats go to logs/ instead.
    """
    shutil.rmtree(logs, ignore_errors=True)  # datatrove skips tasks a previous run marked complete
    logs.mkdir()
    with open(logs / "console.log", "w", encoding="utf-8") as console:
        for name, n_tasks, steps in tqdm(stages, desc="clean_corpus", disable=not progress):
            if name != "filter" and not any(f.stat().st_size for f in filtered.glob("*.jsonl")):
                break  # nothing passed the filters: datatrove's readers refuse a folder with no files
            with contextlib.redirect_stderr(console):
                make_executor(steps, n_tasks, min(n_tasks, workers), str(logs / name)).run()


def _publish(scratch: Path, output: Path) -> None:
    """Move clean/, rejected/ and stats.json from the scratch folder into `output`, each by rename."""
    for name in ("clean", "rejected", "stats.json"):
        target = scratch / name
        if name != "stats.json":
            target.mkdir(exist_ok=True)  # a run that keeps or rejects nothing still has both folders
        with atomic_path(output / name) as tmp:
            target.rename(tmp)
    shutil.rmtree(scratch)


def _shard_inputs(raw_files: list[Path], raw_dir: Path, rejected: Path, shards: int) -> int:
    """Copy the raw records into `shards` files (one per datatrove task) and return their count.

    Records with empty text go straight to rejected/ as "empty": datatrove's readers skip
    empty documents without a trace, and nothing may be lost silently.
    """
    raw_dir.mkdir(parents=True)
    rejected.mkdir(parents=True)
    n = 0
    with contextlib.ExitStack() as files:
        outs = [files.enter_context(open(raw_dir / f"{i:05d}.jsonl", "w", encoding="utf-8")) for i in range(shards)]
        empty = files.enter_context(open(rejected / "empty-00000.jsonl", "w", encoding="utf-8"))
        for f in raw_files:
            with open(f, encoding="utf-8", newline="\n") as lines:
                for line in lines:
                    if not line.strip():
                        continue
                    rec = json.loads(line)
                    if rec.get("text"):
                        outs[n % shards].write(line if line.endswith("\n") else line + "\n")
                    else:
                        empty.write(json.dumps({**rec, "reason": "empty"}, ensure_ascii=False) + "\n")
                    n += 1
    return n


def _count(input_documents: int, clean: Path, rejected: Path, bands: list) -> CleanStats:
    """Stats read back from the written files, so they cannot disagree with them."""
    dropped, pii, splits = Counter(), Counter(), Counter()
    kept = kept_bytes = 0
    by_lang: dict = {}
    for f in sorted(rejected.glob("*.jsonl")) if rejected.exists() else []:
        for rec in read_jsonl(f):
            dropped[rec["reason"]] += 1
    for f in sorted(clean.glob("*.jsonl")) if clean.exists() else []:
        for rec in read_jsonl(f):
            kept += 1
            n = len(rec["text"].encode("utf-8"))
            kept_bytes += n
            splits[rec["split"]] += 1
            lang = by_lang.setdefault(rec["lang"] or "unknown", {"documents": 0, "bytes": 0, "validation_documents": 0})
            lang["documents"] += 1
            lang["bytes"] += n
            lang["validation_documents"] += rec["split"] == "validation"
            pii.update(rec.get("pii", {}))
    total_dropped = sum(dropped.values())
    if kept + total_dropped != input_documents:
        raise RuntimeError(f"clean_corpus lost documents: {input_documents} in, {kept} kept, {total_dropped} dropped")
    return CleanStats(
        input_documents, kept, dict(sorted(dropped.items())), dict(sorted(pii.items())),
        {"train": splits["train"], "validation": splits["validation"]}, kept_bytes, bands,
        dict(sorted(by_lang.items())),
    )  # fmt: skip


def read_split(clean_dir: Path, split: str):
    """Every record of one split of a cleaned corpus, in file order."""
    for f in sorted(Path(clean_dir).glob(f"{split}-*.jsonl")):
        yield from read_jsonl(f)


def load_stats(output: Path) -> dict:
    return json.loads((Path(output) / "stats.json").read_text(encoding="utf-8"))
