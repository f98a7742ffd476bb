"""clean_corpus on a real Ray cluster: a head and a second node, each its own `ray start` process on
127.0.0.1, run the same datatrove steps as the local executor and write the same files."""

import hashlib
import json
import random
from pathlib import Path

import pytest

from pipeline.config import CleanSettings
from pipeline.data.clean import clean_corpus
from pipeline.errors import KilnError

pytest.importorskip("ray", reason="Ray is not installed (the `ray` extra: pip install '.[ray]')")

from pipeline.data.executors import local_ray_cluster  # noqa: E402  (after the skip: it starts `ray`)


def _corpus(path: Path) -> int:
    rng = random.Random(3)
    vocab = [f"{w}{i}" for i, w in enumerate(["river", "stone", "garden", "window", "signal"] * 40)]
    texts = [" ".join(rng.choice(vocab) for _ in range(150)) + "." for _ in range(40)]
    texts += [texts[0].replace(" ", "  "), " ".join(texts[1].split()[:-5] + ["changed"] * 5)]  # exact, near
    texts += [texts[2] + " Contact kim.minsu@naver.com or 010-1234-5678.", "tiny", ""]
    rows = [{"id": f"doc{i}", "text": t, "source": "t", "lang": "en"} for i, t in enumerate(texts)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return len(rows)


def _hashes(output: Path) -> dict:
    """Content hash of every file clean_corpus publishes (clean/, rejected/, stats.json)."""
    files = [output / "stats.json", *sorted((output / "clean").glob("*")), *sorted((output / "rejected").glob("*"))]
    return {str(f.relative_to(output)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.mark.slow
def test_a_ray_cluster_cleans_to_the_same_files_as_the_local_executor(tmp_path):
    raw = tmp_path / "raw.jsonl"
    n = _corpus(raw)
    settings = CleanSettings(tasks=2, minhash_hashes=16, short_doc_keep=0.0)
    local = clean_corpus([raw], tmp_path / "local", settings, progress=False)
    with local_ray_cluster(nodes=2, timeout=600) as address:  # a loaded machine starts Ray nodes slowly
        ray_settings = CleanSettings(**{**settings.__dict__, "executor": "ray", "ray_address": address})
        on_ray = clean_corpus([raw], tmp_path / "ray", ray_settings, progress=False)
        # each task ran as a Ray actor: datatrove's Ray executor leaves its per-task logs
        assert sorted(p.name for p in (tmp_path / "ray" / "logs" / "final" / "logs").glob("task_*.log")) == [
            "task_00000.log", "task_00001.log"
        ]  # fmt: skip
    assert on_ray == local
    assert local.input_documents == n
    assert local.kept_documents > 0
    assert set(local.dropped) >= {"exact_duplicate", "near_duplicate", "empty"}
    assert _hashes(tmp_path / "ray") == _hashes(tmp_path / "local")
    assert len(_hashes(tmp_path / "local")) >= 5  # stats.json, two clean shards, rejected files


def test_an_unreachable_ray_address_is_one_clear_error(tmp_path):
    raw = tmp_path / "raw.jsonl"
    _corpus(raw)
    settings = CleanSettings(executor="ray", ray_address="127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(KilnError, match=r"clean.ray_address 127.0.0.1:9: no Ray cluster"):
        clean_corpus([raw], tmp_path / "out", settings, progress=False)
    assert not (tmp_path / "out" / "clean").exists()


def test_executor_setting_is_checked_and_slurm_points_to_its_script(tmp_path):
    with pytest.raises(KilnError, match="clean.executor must be local, ray or slurm, not 'spark'"):
        CleanSettings(executor="spark")
    raw = tmp_path / "raw.jsonl"
    _corpus(raw)
    with pytest.raises(KilnError, match="docs/deploy/clean_slurm.py"):
        clean_corpus([raw], tmp_path / "out", CleanSettings(executor="slurm"), progress=False)
