"""A careless user's mistakes: each is one line naming the path, exit status 2, no traceback."""

import json
import os
import socket
import time

import pytest

from pipeline.cli import main
from pipeline.io import read_jsonl, write_jsonl


def _kiln(argv, capsys) -> str:
    """Run `kiln argv`; assert exit 2 with exactly one `kiln: error:` line and no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]  # progress bars aside
    assert len(lines) == 1, err
    assert lines[0].startswith("kiln: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def folder(tmp_path):
    src = tmp_path / "docs"
    src.mkdir()
    (src / "a.txt").write_text("a perfectly fine document about rivers and stones. " * 20)
    return src


def test_dangling_symlink_in_an_input_folder(folder, tmp_path, capsys):
    (folder / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    line = _kiln(["clean", str(folder), "-o", str(tmp_path / "out"), "-q"], capsys)
    assert str(folder / "gone.txt") in line
    assert "dangling or looping" in line


def test_looping_symlink_in_an_input_folder(folder, tmp_path, capsys):
    os.symlink(folder / "loop.txt", folder / "loop.txt")
    line = _kiln(["clean", str(folder), "-o", str(tmp_path / "out"), "-q"], capsys)
    assert str(folder / "loop.txt") in line


def test_parquet_with_a_corrupt_data_page(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"text": [f"document {i} with some words" for i in range(2000)]}), bad)
    data = bytearray(bad.read_bytes())
    data[8:40] = b"\xff" * 32  # the first page header; the footer stays readable
    bad.write_bytes(bytes(data))
    line = _kiln(["clean", str(bad), "-o", str(tmp_path / "out"), "-q"], capsys)
    assert str(bad) in line
    assert "damaged Parquet data page" in line


def test_output_path_that_is_a_file(folder, tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("mine")
    line = _kiln(["clean", str(folder), "-o", str(target), "-q"], capsys)
    assert f"{target}: exists and is not a folder" in line
    assert target.read_text() == "mine"


def test_output_path_that_is_not_writable(folder, tmp_path, capsys):
    # /proc refuses new folders even to root, which ignores permission bits
    line = _kiln(["clean", str(folder), "-o", "/proc/kiln-out", "-q"], capsys)
    assert "/proc/kiln-out: not a writable folder" in line
    line = _kiln(["clean", str(folder), "-o", str(folder / "a.txt" / "sub"), "-q"], capsys)
    assert f"{folder / 'a.txt' / 'sub'}: not a writable folder" in line


def test_pull_into_an_existing_file(tmp_path, capsys):
    target = tmp_path / "model.gguf"
    target.write_bytes(b"keep")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    line = _kiln(["pull", "production", "-o", str(target), "--tracking-uri", uri, "--profile", "tiny"], capsys)
    assert f"{target}: exists and is not a folder" in line
    assert target.read_bytes() == b"keep"


def test_an_unreachable_tracking_server_says_so_quickly(tmp_path, capsys):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    unused = tmp_path / "unused"
    for argv in (["promote", "1"], ["pull", "1", "-o", str(unused)], ["models"], ["rollback"]):
        start = time.perf_counter()
        line = _kiln([*argv, "--tracking-uri", uri, "--profile", "tiny"], capsys)
        assert f"the tracking server at {uri} is unreachable" in line, line
        assert time.perf_counter() - start < 30  # MLflow's own retries would take minutes
    assert not unused.exists()  # nothing created for a pull that could not start


def test_jsonl_is_split_on_newlines_only(tmp_path):
    from pipeline.eval.humaneval import read_samples

    rows = [{"task_id": "HumanEval/0", "completion": "    return 1\u2028 # \u2029\x85\x1c\r ok\n"}]
    path = tmp_path / "s.jsonl"
    write_jsonl(path, rows)  # ensure_ascii=False: the separators are written as they are
    assert "\u2028" in path.read_text(encoding="utf-8")
    assert read_samples(path) == rows
    assert list(read_jsonl(path)) == rows
    path.write_text(json.dumps(rows[0], ensure_ascii=False) + "\r\n", encoding="utf-8", newline="")
    assert list(read_jsonl(path)) == rows
