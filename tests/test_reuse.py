"""Stage keys and records (pipeline/reuse.py): what makes a stage reuse its result, and what not."""

import hashlib
import os
import time
from dataclasses import dataclass

from pipeline import reuse
from pipeline.reuse import HashCache, stage_key


@dataclass
class Settings:
    steps: int = 30
    lr: float = 1e-3


def make_inputs(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"\x01" * 1000)
    (model / "config.json").write_text('{"layers": 1}')
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a"}\n')
    return [model, data]


def test_the_same_code_settings_and_inputs_give_the_same_key(tmp_path):
    inputs = make_inputs(tmp_path)
    first = stage_key("1", Settings(), inputs, HashCache(tmp_path / "h.json"))
    assert stage_key("1", Settings(), inputs, HashCache(tmp_path / "h.json")) == first  # the cache file, read back
    assert stage_key("1", Settings(), inputs, HashCache(tmp_path / "other.json")) == first  # hashed afresh


def test_a_changed_setting_code_version_or_input_changes_the_key(tmp_path):
    inputs = make_inputs(tmp_path)
    hashes = HashCache(tmp_path / "h.json")
    first = stage_key("1", Settings(), inputs, hashes)
    assert stage_key("1", Settings(steps=31), inputs, hashes) != first
    assert stage_key("2", Settings(), inputs, hashes) != first
    assert stage_key("1", {"eval": Settings(), "seq_len": 64}, inputs, hashes) != first
    (inputs[0] / "weights.bin").write_bytes(b"\x02" * 1000)  # same size, new bytes and mtime
    assert stage_key("1", Settings(), inputs, hashes) != first


def test_a_folder_hash_counts_names_and_files_but_not_hidden_records(tmp_path):
    model = make_inputs(tmp_path)[0]
    hashes = HashCache(tmp_path / "h.json")
    first = hashes.content(model)
    (model / reuse.RECORD).write_text("{}")  # a stage record and an atomic write's temporary name
    (model / ".weights.bin.tmp-1").write_text("half")
    assert hashes.content(model) == first
    (model / "extra.txt").write_text("")
    assert hashes.content(model) != first
    (model / "extra.txt").rename(model / "renamed.txt")
    second = hashes.content(model)
    (model / "renamed.txt").rename(model / "extra.txt")
    assert second != hashes.content(model)
    assert hashes.content(tmp_path / "absent") == "missing"


def test_a_file_is_read_again_only_when_its_size_or_mtime_changed(tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(b"a" * 4096)
    old = hashlib.sha256(b"a" * 4096).hexdigest()
    assert HashCache(tmp_path / "h.json").file(path) == old
    reuse.content_hash(tmp_path / "h.json", path)  # saved for the next process
    stamp = path.stat()
    path.write_bytes(b"b" * 4096)  # same size, and the old mtime put back: the cached hash is trusted
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    cache = HashCache(tmp_path / "h.json")
    assert cache.file(path) == old
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1))  # a new mtime: read again
    assert cache.file(path) == hashlib.sha256(b"b" * 4096).hexdigest()


def test_a_record_vouches_only_for_its_own_key_and_untouched_outputs(tmp_path):
    stage = tmp_path / "sft_model"
    (stage / "model").mkdir(parents=True)
    (stage / "model" / "weights.bin").write_bytes(b"w" * 100)
    hashes = HashCache(tmp_path / "h.json")
    assert reuse.finished(stage, "k1", hashes) is None
    reuse.remember(stage, "k1", "run-1", 12.5, '{"steps": 30}', hashes)
    record = reuse.finished(stage, "k1", hashes)
    assert record["run_id"] == "run-1"
    assert record["metadata"] == '{"steps": 30}'
    assert record["seconds"] == 12.5
    assert reuse.finished(stage, "k2", hashes) is None
    (stage / "model" / "weights.bin").unlink()  # an output deleted by hand: the record no longer holds
    assert reuse.finished(stage, "k1", hashes) is None
    (stage / "model" / "weights.bin").write_bytes(b"w" * 100)
    assert reuse.finished(stage, "k1", hashes) is not None
    reuse.forget(stage)  # a stage that starts computing: its old outputs are no longer vouched for
    assert reuse.finished(stage, "k1", hashes) is None
    (stage / reuse.RECORD).write_text("{not json")
    assert reuse.finished(stage, "k1", hashes) is None


def test_the_time_table_lists_the_stages_of_this_run_only(tmp_path):
    log = tmp_path / "timings.jsonl"
    reuse.log_timing(log, "base_model", "old", 120.0, 230.0, reused=False)
    time.sleep(0.01)  # `kiln run` starts its clock after any earlier run's lines were written
    since = time.time()
    reuse.log_timing(log, "base_model", "new", 0.4, 0.3, reused=True)
    reuse.log_timing(log, "eval_report", "new", 31.25, 58.5, reused=False)
    rows = reuse.timings_since(log, since)
    assert [(r["stage"], r["reused"]) for r in rows] == [("base_model", True), ("eval_report", False)]
    table = reuse.time_table(rows, 40.0)
    assert "base_model" in table
    assert "reused" in table
    assert "31.2" in table
    assert "58.5" in table
    assert "40.0" in table
    assert "120.0" not in table
