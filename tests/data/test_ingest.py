"""raw_corpus: every source format, the code/prose mix, and bad input."""

import ast
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.ingest import (
    IngestError,
    Source,
    build_raw_corpus,
    definitions_in,
    guess_lang,
    read_source,
    split_long,
)
from pipeline.io import read_jsonl

CODE = "def greet(name):\n    return f'hello {name}'\n"
PROSE = "Dagster materializes assets. MLflow tracks runs and registers models for release.\n"


def _rows(path):
    return list(read_jsonl(path))


def test_reads_text_jsonl_parquet_and_folders(tmp_path):
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    (src / "a.py").write_text(CODE)
    (src / "nested" / "notes.md").write_text(PROSE)
    (src / "rows.jsonl").write_text(json.dumps({"body": "안녕하세요. 한국어 문서입니다.", "id": "k1"}) + "\n")
    pq.write_table(pa.table({"body": ["parquet prose row one", "row two"]}), src / "t.parquet")
    (src / "image.png").write_bytes(b"\x89PNG\r\n")  # not a text source: skipped inside a folder
    recs = list(read_source(Source(path=str(src), text_field="body")))
    by_text = {r["text"]: r for r in recs}
    assert set(by_text) == {CODE, PROSE, "안녕하세요. 한국어 문서입니다.", "parquet prose row one", "row two"}
    assert by_text[CODE]["lang"] == "python"
    assert by_text[PROSE]["lang"] == "en"
    assert by_text["안녕하세요. 한국어 문서입니다."]["lang"] == "ko"
    assert by_text["안녕하세요. 한국어 문서입니다."]["id"] == "k1"
    assert all(set(r) >= {"id", "text", "source", "lang"} for r in recs)


def test_builtin_sources_are_real_python_text():
    code = next(read_source(Source(builtin="python_stdlib")))
    docs = next(read_source(Source(builtin="python_docs")))
    assert code["lang"] == "python"
    assert code["id"].startswith("python_stdlib:")
    assert docs["lang"] == "en"
    assert len(docs["text"]) > 100


def test_hf_dataset_from_a_local_folder(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(3)))
    recs = list(read_source(Source(hf_dataset=str(folder))))
    assert [r["text"] for r in recs] == ["document 0", "document 1", "document 2"]


def test_unavailable_hf_dataset_is_a_clear_error():
    with pytest.raises(IngestError, match="hf dataset 'no-such-org/no-such-dataset': cannot be loaded"):
        list(read_source(Source(hf_dataset="no-such-org/no-such-dataset")))


def test_code_share_holds_when_one_kind_runs_short(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"m{i}.py").write_text(f"# module {i}\n" + CODE * 2)
    (src / "only.md").write_text(PROSE * 10)  # little prose: code must be cut to keep 60/40
    stats = build_raw_corpus(
        [Source(path=str(src))], tmp_path / "raw.jsonl", max_bytes=100_000, code_share=0.6, progress=False
    )
    code, prose = stats.by_kind["code"]["bytes"], stats.by_kind["prose"]["bytes"]
    assert prose == len(PROSE * 10)
    assert 0.55 <= code / (code + prose) <= 0.65
    assert len(_rows(tmp_path / "raw.jsonl")) == stats.documents


def test_max_bytes_budget(tmp_path):
    out = tmp_path / "raw.jsonl"
    stats = build_raw_corpus(
        [Source(builtin="python_stdlib"), Source(builtin="python_docs")], out, max_bytes=300_000, progress=False
    )
    assert 250_000 <= stats.bytes <= 360_000
    share = stats.by_kind["code"]["bytes"] / stats.bytes
    assert 0.5 < share < 0.7
    ids = [r["id"] for r in _rows(out)]
    assert len(ids) == len(set(ids))


def test_bad_rows_are_carried_with_their_problem(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "good row"}\n{"text": broken\n{"other": 1}\n\xff\xfe{"text": "x"}\n')
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    recs = list(read_source(Source(path=str(bad)))) + list(read_source(Source(path=str(latin1))))
    errors = [r.get("error", "").split(" ")[0] for r in recs]
    assert errors == ["", "malformed_json", "missing_text_field", "not_utf8", "not_utf8"]
    assert recs[1]["id"] == "bad.jsonl:2"
    assert recs[1]["source"] == str(bad)


def test_ids_do_not_depend_on_where_the_sources_lie(tmp_path):
    # the train/validation split hashes ids: a clone in another folder must split alike
    for where in ("a", "b/c"):
        (tmp_path / where / "src" / "pkg").mkdir(parents=True)
        (tmp_path / where / "src" / "pkg" / "m.py").write_text("x = 1\n")
        (tmp_path / where / "src" / "rows.jsonl").write_text('{"text": "one"}\n')
    ids = [sorted(r["id"] for r in read_source(Source(path=str(tmp_path / w / "src")))) for w in ("a", "b/c")]
    assert ids[0] == ids[1] == ["src/pkg/m.py", "src/rows.jsonl:1"]
    single = list(read_source(Source(path=str(tmp_path / "a" / "src" / "pkg" / "m.py"))))
    assert [r["id"] for r in single] == ["m.py"]  # a file on its own: its name


def test_request_problems_are_errors(tmp_path):
    with pytest.raises(IngestError, match="no such file or folder"):
        list(read_source(Source(path=str(tmp_path / "missing.txt"))))
    wrong_field = tmp_path / "w.jsonl"
    wrong_field.write_text('{"body": "a"}\n{"body": "b"}\n')
    with pytest.raises(IngestError, match="no record has a string field 'text'"):
        list(read_source(Source(path=str(wrong_field))))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(IngestError, match="no documents"):
        build_raw_corpus([Source(path=str(empty))], tmp_path / "raw.jsonl", progress=False)
    assert not (tmp_path / "raw.jsonl").exists()  # nothing half-written
    with pytest.raises(IngestError, match="exactly one of"):
        Source()


def test_guess_lang_and_split_long():
    assert guess_lang("fn main() {}", ".rs") == "rust"
    assert guess_lang("이것은 한국어 문장입니다") == "ko"
    assert guess_lang("1234 5678") == "unknown"
    parts = split_long("a" * 50 + "\n\n" + "b" * 50 + "\n\n" + "c" * 50, 110)
    assert parts == ["a" * 50 + "\n\n" + "b" * 50, "c" * 50]


def _hangul_share(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum("\uac00" <= c <= "\ud7a3" for c in letters) / len(letters)


def test_korean_prose_builtin_is_real_korean():
    recs = list(read_source(Source(builtin="korean_prose")))
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids)) >= 15
    assert {r["lang"] for r in recs} == {"ko"}
    assert {r["source"] for r in recs} == {"korean_prose"}
    assert all(_hangul_share(r["text"]) > 0.9 for r in recs)
    assert recs[0]["text"].startswith("대한민국헌법")  # the Constitution's title, then its preamble
    assert sum(r["id"].startswith("korean_prose:kobill/") for r in recs) == 10
    # Every chapter is there, and none is left too short for the prose quality floor.
    text = "\n".join(r["text"] for r in recs)
    assert all(f"제{n}장 " in text for n in range(1, 11))
    assert min(len(r["text"].split()) for r in recs) >= 100
    assert sum(len(r["text"].encode("utf-8")) for r in recs) > 100_000


def test_korean_prose_is_taken_whole_under_a_byte_budget(tmp_path):
    korean = sum(len(r["text"].encode("utf-8")) for r in read_source(Source(builtin="korean_prose")))
    stats = build_raw_corpus(
        [Source(builtin="python_stdlib"), Source(builtin="korean_prose"), Source(builtin="python_docs")],
        tmp_path / "raw.jsonl", max_bytes=600_000, code_share=0.6, progress=False,
    )  # fmt: skip
    assert stats.by_lang["ko"]["bytes"] == korean  # counted as prose, not squeezed out by the docs
    assert stats.by_lang["en"]["bytes"] > 0
    prose = stats.by_kind["prose"]
    langs = {lang: v for lang, v in stats.by_lang.items() if lang in ("ko", "en")}
    assert sum(v["bytes"] for v in langs.values()) == prose["bytes"]
    assert sum(v["documents"] for v in stats.by_lang.values()) == stats.documents
    assert 0.55 < stats.by_kind["code"]["bytes"] / stats.bytes < 0.65


def test_korean_prose_without_konlpy_is_one_line(monkeypatch):
    import importlib.util

    # konlpy is a dependency, so its absence can only be simulated.
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(IngestError, match="korean_prose needs the konlpy package"):
        list(read_source(Source(builtin="korean_prose")))


def test_docstring_walk_finds_every_definition_in_ast_walk_order():
    source = '''
"""module"""
import ast
f = lambda x: x
class A:
    """a"""
    def m(self):
        def inner(): pass
        return [lambda: 1]
    class B:
        async def c(self): pass
if f:
    def g(): pass
else:
    def h(): pass
try:
    def t(): pass
except ValueError:
    def e(): pass
else:
    def el(): pass
finally:
    def fi(): pass
while False:
    def w(): pass
for i in ():
    def fo(): pass
with open("x") as fh:
    def wi(): pass
match 1:
    case 1:
        def ma(): pass
async def top():
    async with x:
        def aw(): pass
'''
    tree = ast.parse(source)
    kinds = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    expected = [tree] + [n for n in ast.walk(tree) if isinstance(n, kinds)]
    assert definitions_in(tree) == expected
    assert len(expected) == 18
