"""clean_corpus on datatrove: exact and near duplicates, rejections with reasons, stats, split."""

import json
import random

import pytest
from child import run_python

from pipeline.config import CleanSettings
from pipeline.data.clean import clean_corpus, minhash_bands, read_split
from pipeline.io import read_jsonl

CODE = (
    'import os\n\n\ndef main():\n    """Print the working directory and the environment."""\n'
    "    print(os.getcwd())\n    for key, value in sorted(os.environ.items()):\n        print(key, value)\n\n\n"
    "if __name__ == '__main__':\n    main()\n"
)


def _prose(seed: int, words: int = 120) -> str:
    rng = random.Random(seed)
    vocab = [f"{w}{i}" for i, w in enumerate(["river", "stone", "garden", "window", "signal", "market"] * 60)]
    return " ".join(rng.choice(vocab) for _ in range(words)) + "."


def _write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def corpus(tmp_path):
    base = _prose(1, 200)
    words = base.split()
    near = " ".join(words[:-6] + ["changed"] * 6)  # Jaccard of 5-gram shingles well above 0.8
    rows = [
        {"id": "orig", "text": base, "source": "t", "lang": "en"},
        {"id": "exact", "text": base.replace(" ", "  "), "source": "t", "lang": "en"},  # whitespace only
        {"id": "near", "text": near, "source": "t", "lang": "en"},
        {
            "id": "pii",
            "text": _prose(2) + " Contact kim.minsu@naver.com or 010-1234-5678.",
            "source": "t",
            "lang": "en",
        },
        {"id": "short", "text": "tiny", "source": "t", "lang": "en"},
        {"id": "empty", "text": "", "source": "t/__init__.py", "lang": "python"},
        {"id": "blank", "text": "  \n ", "source": "t", "lang": "en"},
        {"id": "broken", "text": "{oops", "source": "f.jsonl", "lang": "unknown", "error": "malformed_json (x)"},
        {"id": "code", "text": CODE, "source": "t", "lang": "python"},
        {"id": "short_code", "text": "a = 1\nb = 2\nc = a + b\n", "source": "t", "lang": "python"},
    ] + [{"id": f"doc{i}", "text": _prose(100 + i), "source": "t", "lang": "en"} for i in range(40)]
    raw = tmp_path / "raw.jsonl"
    _write(raw, rows)
    return raw, len(rows)


def test_clean_removes_duplicates_masks_pii_and_counts_everything(tmp_path, corpus):
    raw, n = corpus
    out = tmp_path / "out"
    stats = clean_corpus([raw], out, CleanSettings(short_doc_keep=0.0), progress=False)
    assert stats.input_documents == n
    assert stats.kept_documents + sum(stats.dropped.values()) == n
    assert stats.dropped["exact_duplicate"] == 1
    assert stats.dropped["near_duplicate"] == 1
    assert stats.dropped["malformed_json"] == 1
    assert stats.dropped["too_few_words"] == 1
    assert stats.dropped["sampled_out_short"] == 1
    assert stats.dropped["empty"] == 2  # one empty text (datatrove's reader would skip it), one blank
    assert stats.pii == {"email": 1, "phone": 1}

    kept = {r["id"]: r for f in (out / "clean").glob("*.jsonl") for r in read_jsonl(f)}
    assert "orig" in kept
    assert "exact" not in kept
    assert "near" not in kept
    assert "code" in kept
    assert "<EMAIL>" in kept["pii"]["text"]
    assert "naver.com" not in kept["pii"]["text"]
    rejected = [r for f in (out / "rejected").glob("*.jsonl") for r in read_jsonl(f)]
    assert {r["id"]: r["reason"] for r in rejected}["near"] == "near_duplicate"
    assert all(r["reason"] for r in rejected)
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk["kept_documents"] == stats.kept_documents
    assert not (out / ".clean-scratch").exists()


def test_split_is_deterministic_and_disjoint(tmp_path, corpus):
    raw, _ = corpus
    settings = CleanSettings(validation_share=0.2)
    ids = []
    for run in ("a", "b"):
        clean_corpus([raw], tmp_path / run, settings, progress=False)
        train = {r["id"] for r in read_split(tmp_path / run / "clean", "train")}
        val = {r["id"] for r in read_split(tmp_path / run / "clean", "validation")}
        assert train
        assert val
        assert not train & val
        ids.append((train, val))
    assert ids[0] == ids[1]


def test_chunks_of_one_file_stay_in_one_split(tmp_path):
    """Ingest cuts a long file into `id`, `id#1`, `id#2`: a file in both splits would leak."""
    rows = [
        {"id": f"file{k}" + (f"#{i}" if i else ""), "text": _prose(1000 + 10 * k + i), "source": "t", "lang": "en"}
        for k in range(12)
        for i in range(3)
    ]
    _write(tmp_path / "raw.jsonl", rows)
    clean_corpus([tmp_path / "raw.jsonl"], tmp_path / "out", CleanSettings(validation_share=0.4), progress=False)
    split_of = {
        r["id"]: split for split in ("train", "validation") for r in read_split(tmp_path / "out" / "clean", split)
    }
    assert len(split_of) == len(rows)  # nothing dropped: every chunk is checked
    files = {k: {split_of[r["id"]] for r in rows if r["id"].split("#")[0] == f"file{k}"} for k in range(12)}
    assert all(len(splits) == 1 for splits in files.values()), files
    assert {s for (s,) in files.values()} == {"train", "validation"}


def test_dissimilar_documents_are_kept(tmp_path):
    a = _prose(7, 200)
    words = a.split()
    half = " ".join(words[:100] + _prose(8, 100).split())  # Jaccard about 0.3
    raw = tmp_path / "raw.jsonl"
    _write(raw, [{"id": "a", "text": a, "lang": "en"}, {"id": "b", "text": half, "lang": "en"}])
    stats = clean_corpus([raw], tmp_path / "out", CleanSettings(), progress=False)
    assert stats.kept_documents == 2


def test_minhash_bands_follow_the_threshold():
    b8, r8 = minhash_bands(0.8, 112)
    b5, r5 = minhash_bands(0.5, 112)
    assert b8 * r8 <= 112
    assert b5 * r5 <= 112
    # The S-curve's midpoint (1/b)^(1/r) sits near the asked threshold.
    assert abs((1 / b8) ** (1 / r8) - 0.8) < 0.08
    assert abs((1 / b5) ** (1 / r5) - 0.5) < 0.08


def test_invalid_settings_are_named():
    from pipeline.config import ProfileError

    with pytest.raises(ProfileError, match="minhash_threshold"):
        CleanSettings(minhash_threshold=1.5)


@pytest.mark.parametrize(
    "content",
    [b"", b"\x00\x01\x02\xff\xfe binary \x00" * 50, b"tiny\n\nshort one\n\nab 010-2345-6789\n"],
    ids=["empty file", "binary file", "only short documents"],
)
def test_clean_where_nothing_survives_gives_empty_outputs(tmp_path, content, capsys):
    from pipeline.cli import main

    src = tmp_path / "in.txt"
    src.write_bytes(content)
    out = tmp_path / "out"
    assert main(["clean", str(src), "-o", str(out), "-q", "--profile", "tiny"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kept_documents"] == 0
    assert list((out / "clean").iterdir()) == []
    rejected = [r for f in sorted((out / "rejected").glob("*.jsonl")) for r in read_jsonl(f)]
    assert summary["input_documents"] == sum(summary["dropped"].values()) == len(rejected)
    assert all(r["reason"] for r in rejected)
    assert json.loads((out / "stats.json").read_text())["kept_documents"] == 0


def test_rejected_documents_are_masked_too(tmp_path):
    raw = tmp_path / "raw.jsonl"
    _write(raw, [{"id": "s", "text": "call 010-2345-6789로 or kim@naver.com", "source": "t", "lang": "en"}])
    clean_corpus([raw], tmp_path / "out", CleanSettings(short_doc_keep=0.0), progress=False)
    (rejected,) = [r for f in (tmp_path / "out" / "rejected").glob("*.jsonl") for r in read_jsonl(f)]
    assert rejected["text"] == "call <PHONE>로 or <EMAIL>"
    assert rejected["reason"]


def test_korean_prose_reaches_the_clean_corpus(tmp_path):
    """raw -> clean on the korean_prose builtin beside English prose and code: the Korean is kept
    (the English-only Gopher rules do not apply to it), its PII masked, its numbers left alone."""
    from pipeline.data.ingest import Source, build_raw_corpus

    src = tmp_path / "src"
    src.mkdir()
    for i in range(10):
        (src / f"note{i}.txt").write_text(_prose(300 + i), encoding="utf-8")
        (src / f"mod{i}.py").write_text(f"# module {i}\n" + CODE, encoding="utf-8")
    raw = tmp_path / "raw.jsonl"
    ingest = build_raw_corpus([Source(builtin="korean_prose"), Source(path=str(src))], raw, None, None, progress=False)
    stats = clean_corpus([raw], tmp_path / "out", CleanSettings(validation_share=0.2), progress=False)

    kept = [r for split in ("train", "validation") for r in read_split(tmp_path / "out" / "clean", split)]
    korean = [r for r in kept if r["lang"] == "ko"]
    rejected = [r for f in (tmp_path / "out" / "rejected").glob("*.jsonl") for r in read_jsonl(f)]
    korean_rejected = [r for r in rejected if r["lang"] == "ko"]
    assert len(korean) + len(korean_rejected) == ingest.by_lang["ko"]["documents"]  # none lost
    assert len(korean) >= 0.75 * ingest.by_lang["ko"]["documents"]
    # The drops are the rules that hold for every language: tables of figures (under 80% of
    # words with a letter) and the same amendment filed for three civil-service laws.
    assert {r["reason"] for r in korean_rejected} <= {"alpha_words", "near_duplicate"}
    assert stats.by_lang["ko"] == {
        "documents": len(korean),
        "bytes": sum(len(r["text"].encode("utf-8")) for r in korean),
        "validation_documents": sum(r["split"] == "validation" for r in korean),
    }
    text = "\n".join(r["text"] for r in korean + korean_rejected)
    assert "assembly.go.kr" not in text
    assert "02-788-4649" not in text
    assert "<EMAIL>" in text
    assert "<PHONE>" in text
    assert "1987.10.29." in text
    assert "제63조제2항제4호" in text


def test_a_docstring_document_and_vendored_copies_split_with_their_file(tmp_path):
    """The docstrings of stdlib module X (`python_docstrings:X`) are text of `python_stdlib:X`, and
    `pip/_vendor/requests/api.py` is `requests/api.py`: hashed apart, about half of such pairs
    would put one in training and the other in validation."""
    rows = []
    for k in range(16):
        rows.append({"id": f"python_stdlib:mod{k}.py", "text": _prose(3000 + k), "source": "s", "lang": "en"})
        rows.append({"id": f"python_docstrings:mod{k}.py#1", "text": _prose(4000 + k), "source": "d", "lang": "en"})
        rows.append({"id": f"site_packages:pkg{k}/api.py", "text": _prose(5000 + k), "source": "p", "lang": "en"})
        vendored = f"site_packages:pip/_vendor/pkg{k}/api.py~ab12"
        rows.append({"id": vendored, "text": _prose(6000 + k), "source": "p", "lang": "en"})
    _write(tmp_path / "raw.jsonl", rows)
    clean_corpus([tmp_path / "raw.jsonl"], tmp_path / "out", CleanSettings(validation_share=0.4), progress=False)
    split_of = {
        r["id"]: split for split in ("train", "validation") for r in read_split(tmp_path / "out" / "clean", split)
    }
    assert len(split_of) == len(rows)
    for k in range(16):
        assert split_of[f"python_stdlib:mod{k}.py"] == split_of[f"python_docstrings:mod{k}.py#1"], k
        assert split_of[f"site_packages:pkg{k}/api.py"] == split_of[f"site_packages:pip/_vendor/pkg{k}/api.py~ab12"], k
    assert set(split_of.values()) == {"train", "validation"}


def test_origin_file_maps_derived_documents_to_their_file():
    from pipeline.sources import origin_file

    assert origin_file("python_docstrings:json/decoder.py#2") == "python_stdlib:json/decoder.py"
    assert origin_file("site_packages:setuptools/_vendor/packaging/tags.py") == "site_packages:packaging/tags.py"
    assert origin_file("notes.txt~0a1b2c3d") == "notes.txt"
    assert origin_file("data/x.jsonl:17#1") == "data/x.jsonl:17"


@pytest.mark.slow
def test_local_workers_stop_in_a_process_that_ignores_sigterm(tmp_path, corpus):
    """A job started in the background has SIGINT ignored, and Dagster points SIGTERM at SIGINT's
    handler: worker processes started then ignore SIGTERM, which is how datatrove's pool stops its idle
    workers, so a run with two workers never returned. In a child process, with a deadline."""
    raw, _ = corpus
    script = (
        "import signal, sys\n"
        "from pathlib import Path\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "from pipeline.config import CleanSettings\n"
        "from pipeline.data.clean import clean_corpus\n"
        "stats = clean_corpus([Path(sys.argv[1])], Path(sys.argv[2]), CleanSettings(tasks=2), progress=False)\n"
        "assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # the caller's setting, given back\n"
        "print(stats.kept_documents)\n"
    )
    code, out, err = run_python(
        script, str(raw), str(tmp_path / "out"), timeout=600,
        hung="clean_corpus with two workers did not return in 10 minutes (its workers ignore SIGTERM)",
    )  # fmt: skip
    assert code == 0, err[-800:]
    assert int(out.split()[-1]) > 0
