"""The MLflow registry on a real sqlite store in tmp_path: register, promote, roll back, verify, pull."""

import multiprocessing
from pathlib import Path

import pytest

from pipeline.errors import KilnError
from pipeline.release import registry
from pipeline.tracking import StageLogger, pipeline_run


def _bundle(root: Path, n: int) -> Path:
    folder = root / f"bundle{n}"
    (folder / "gguf").mkdir(parents=True)
    (folder / "gguf" / "kiln-test-Q4_K_M.gguf").write_bytes(b"GGUF" + bytes([n]) * 1000)
    (folder / "MODEL_CARD.md").write_text(f"# version {n}\n")
    return folder


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    versions = []
    for n in (1, 2):
        run = pipeline_run(uri, "test", f"dagster-run-{n}")
        StageLogger(uri, run, "base_model").metrics({"val_bpb": 2.0 - n / 10})
        tags = {"metric.val_bpb": str(2.0 - n / 10), "dagster_run_id": f"dagster-run-{n}"}
        versions.append(registry.register(uri, "test", run, _bundle(tmp_path, n), tags, gate_passed=True))
    return uri, versions


def test_one_mlflow_run_per_pipeline_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    a = pipeline_run(uri, "test", "run-a")
    assert pipeline_run(uri, "test", "run-a") == a  # a second stage of the same run finds it
    assert pipeline_run(uri, "test", "run-b") != a


def test_two_registrations_in_one_run_keep_their_own_files(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = pipeline_run(uri, "test", "dagster-run-1")
    first = registry.register(uri, "test", run, _bundle(tmp_path, 1), {}, gate_passed=True)
    second = registry.register(uri, "test", run, _bundle(tmp_path, 2), {}, gate_passed=True)
    for n, version in ((1, first), (2, second)):
        folder = registry.verify(uri, "test", version, tmp_path / f"check{n}")  # raises if files changed
        assert (folder / "MODEL_CARD.md").read_text() == f"# version {n}\n"


def test_promote_promote_rollback_rollback(store):
    uri, (v1, v2) = store
    assert [r["version"] for r in registry.list_versions(uri, "test")] == ["1", "2"]
    assert registry.list_versions(uri, "test")[1]["aliases"] == "candidate"

    assert registry.promote(uri, "test", v1)["to"] == "1"
    assert registry.promote(uri, "test")["to"] == "2"  # default: the candidate
    aliases = {r["version"]: r["aliases"] for r in registry.list_versions(uri, "test")}
    assert aliases == {"1": "", "2": "candidate,production"}

    back = registry.rollback(uri, "test")
    assert (back["from"], back["to"]) == ("2", "1")
    with pytest.raises(KilnError, match="no earlier production version"):
        registry.rollback(uri, "test")  # only version 1 ever held production before
    events = registry.history(uri, "test")
    assert [(e["action"], e["from"], e["to"]) for e in events] == [
        ("promote", None, "1"),
        ("promote", "1", "2"),
        ("rollback", "2", "1"),
    ]
    assert all(e["who"] and e["when"] for e in events)
    assert [r["version"] for r in registry.list_versions(uri, "test")] == ["1", "2"]  # nothing deleted


def _production(uri: str) -> str | None:
    return next((r["version"] for r in registry.list_versions(uri, "test") if "production" in r["aliases"]), None)


def _failing(monkeypatch, method: str, once: bool = True):
    """The registry client's `method` raises (a store that drops the connection between two writes): a
    failure the real store cannot be made to produce on cue."""
    from mlflow import MlflowClient

    real, calls = getattr(MlflowClient, method), []

    def broken(self, *args, **kwargs):
        calls.append(args)
        if once and len(calls) > 1:
            return real(self, *args, **kwargs)
        raise ConnectionError("the store went away")

    monkeypatch.setattr(MlflowClient, method, broken)
    return calls


def test_a_promote_that_fails_between_its_writes_leaves_history_and_alias_agreeing(store, monkeypatch):
    uri, (v1, v2) = store
    registry.promote(uri, "test", v1)
    calls = _failing(monkeypatch, "set_registered_model_alias")
    with pytest.raises(KilnError, match="the store went away"):
        registry.promote(uri, "test", v2)
    assert calls
    assert _production(uri) == "1"
    assert [e["to"] for e in registry.history(uri, "test")] == ["1"]  # the event was taken back
    monkeypatch.undo()
    registry.promote(uri, "test", v2)
    assert registry.rollback(uri, "test")["to"] == "1"
    assert _production(uri) == "1"
    assert [(e["action"], e["to"]) for e in registry.history(uri, "test")] == [
        ("promote", "1"), ("promote", "2"), ("rollback", "1"),
    ]  # fmt: skip


def test_a_promote_that_dies_between_its_writes_is_completed_by_the_next_command(store, monkeypatch):
    """The alias write and the take-back both fail (the command died there): the history is one step
    ahead, and the next rollback first completes that move, so it goes back to the right version."""
    uri, (v1, v2) = store
    registry.promote(uri, "test", v1)
    _failing(monkeypatch, "set_registered_model_alias")
    _failing(monkeypatch, "delete_registered_model_tag", once=False)
    with pytest.raises(KilnError):
        registry.promote(uri, "test", v2)
    monkeypatch.undo()
    assert _production(uri) == "1"
    assert [e["to"] for e in registry.history(uri, "test")] == ["1", "2"]
    back = registry.rollback(uri, "test")
    assert (back["from"], back["to"]) == ("2", "1")
    assert _production(uri) == "1"


def test_rollback_twice_walks_back(store, tmp_path):
    uri, (v1, v2) = store
    run = pipeline_run(uri, "test", "dagster-run-3")
    v3 = registry.register(uri, "test", run, _bundle(tmp_path, 3), {}, gate_passed=False)
    for v in (v1, v2, v3):
        registry.promote(uri, "test", v)
    assert registry.rollback(uri, "test")["to"] == "2"
    assert registry.rollback(uri, "test")["to"] == "1"
    assert {r["version"]: r["aliases"] for r in registry.list_versions(uri, "test")}["1"] == "production"


def test_tampered_files_refuse_promotion(store, tmp_path):
    uri, (v1, _) = store
    import mlflow

    stored = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=registry.client(uri).get_model_version("kiln-test", v1).source, tracking_uri=uri,
        dst_path=str(tmp_path / "peek"),
    ))  # fmt: skip
    assert (stored / "MODEL_CARD.md").exists()
    source = registry.client(uri).get_model_version("kiln-test", v1).source.removeprefix("file://")
    (Path(source) / "gguf" / "kiln-test-Q4_K_M.gguf").write_bytes(b"GGUF tampered")
    with pytest.raises(KilnError, match="does not match its sha256 tag"):
        registry.promote(uri, "test", v1)
    assert registry.history(uri, "test") == []  # registry unchanged


def test_added_files_refuse_promotion_pull_and_rollback_and_no_copy_is_left(store, tmp_path, monkeypatch):
    import tempfile

    uri, (v1, v2) = store
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # every temporary copy lands here
    registry.promote(uri, "test", v1)
    registry.promote(uri, "test", v2)
    source = registry.client(uri).get_model_version("kiln-test", v1).source.removeprefix("file://")
    (Path(source) / "tokenizer.json").write_text("{}")  # injected beside the hashed files
    for attempt in (
        lambda: registry.promote(uri, "test", v1),
        lambda: registry.pull(uri, "test", v1, tmp_path / "pulled"),
        lambda: registry.rollback(uri, "test"),  # back to v1: its files are checked too
    ):
        with pytest.raises(KilnError, match="tokenizer.json is stored but has no sha256 tag"):
            attempt()
    assert list(scratch.iterdir()) == []  # the downloaded copies went with each failure
    assert not (tmp_path / "pulled").exists()
    assert [e["to"] for e in registry.history(uri, "test")] == [v1, v2]  # nothing moved


def test_bad_requests_are_clear(store, tmp_path):
    uri, _ = store
    with pytest.raises(KilnError, match="has no version 9"):
        registry.promote(uri, "test", "9")
    with pytest.raises(KilnError, match="no earlier production version"):
        registry.rollback(uri, "test")
    with pytest.raises(KilnError, match="no registered model kiln-other"):
        registry.list_versions(uri, "other")
    out = registry.pull(uri, "test", "candidate", tmp_path / "pulled")
    assert (out / "gguf" / "kiln-test-Q4_K_M.gguf").read_bytes() == b"GGUF" + bytes([2]) * 1000


def _promote(uri, version, queue):
    try:
        queue.put(registry.promote(uri, "test", version)["to"])
    except Exception as exc:  # report, never hang the test
        queue.put(repr(exc))


def test_concurrent_promotions_keep_a_consistent_history(store):
    uri, (v1, v2) = store
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_promote, args=(uri, v, queue)) for v in (v1, v2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert sorted(queue.get(timeout=5) for _ in procs) == ["1", "2"]
    events = registry.history(uri, "test")
    assert len(events) == 2
    # serialized: the second promotion saw the first one's result as its "from"
    assert events[0]["from"] is None
    assert events[1]["from"] == events[0]["to"]
    current = {r["version"]: r["aliases"] for r in registry.list_versions(uri, "test")}
    assert "production" in current[events[1]["to"]]


def test_release_commands(store, tmp_path, capsys, monkeypatch):
    import pipeline.release.registry as reg
    from pipeline.cli import main

    uri, _ = store

    # the store was made for profile "test": point the CLI at it through a YAML profile named test
    profile = tmp_path / "test.yaml"
    profile.write_text("base: tiny\n")
    base = ["--profile", str(profile), "--tracking-uri", uri]
    assert main(["models", *base]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split()[:3] == ["version", "created", "aliases"]
    assert set(listing[1]) == {"-", " "}
    assert len(listing) == 4  # header, rule, two versions
    assert main(["models", "--wide", *base]) == 0
    assert "val_bpb" in capsys.readouterr().out.splitlines()[0]
    assert main(["promote", *base]) == 0
    assert "production -> version 2" in capsys.readouterr().out
    assert main(["promote", "1", *base]) == 0
    assert main(["rollback", *base]) == 0
    assert "rolled back from version 1 to 2" in capsys.readouterr().out
    assert main(["pull", "production", "--output", str(tmp_path / "p"), *base]) == 0
    assert (tmp_path / "p" / "MODEL_CARD.md").read_text() == "# version 2\n"
    assert main(["promote", "7", *base]) == 2
    assert capsys.readouterr().err.strip() == "kiln: error: kiln-test has no version 7"
    assert len(reg.history(uri, "test")) == 3  # the refused promotion recorded nothing
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    bad = ["--profile", str(profile), "--tracking-uri", "http://127.0.0.1:9"]  # nothing listens there
    assert main(["models", *bad]) == 2
    assert "http://127.0.0.1:9" in capsys.readouterr().err


def test_models_table_names_speed_tg128_whatever_the_length_measured():
    from pipeline.cli.release import key_columns

    row = {"version": "3", "created": "2026-12-07 07:00", "aliases": "production", "parameters": "11340032",
           "base_val_bpb": "2.2601508879781123", "Q4_K_M_tg111_tokens_per_s": "1987.6", "F16_tg128_tokens_per_s": "900",
           "kiln-tiny-Q4_K_M.gguf": str(9 * 2**20)}  # fmt: skip
    cols = key_columns(row)
    assert cols["Q4_K_M tg128 tok/s"] == "1,988 (111 tok)"
    assert cols["F16 tg128 tok/s"] == "900"
    assert cols["base bpb"] == "2.260"
    assert cols["params"] == "11.3M"
    assert cols["Q4_K_M MB"] == "9.0"


@pytest.mark.slow  # a fresh MLflow sqlite store takes seconds to create
def test_seeds_records_the_spread_of_retrains_of_one_recipe_and_compare_uses_it(tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.release.compare import compare

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # versions 1-3: one recipe, seeds 0-2; version 4: seed 0 with DPO at 10x its learning rate
    for n, seed, lr, bpb in ((1, 0, 5e-4, 2.37), (2, 1, 5e-4, 2.35), (3, 2, 5e-4, 2.40), (4, 0, 5e-3, 2.41)):
        run = pipeline_run(uri, "test", f"dagster-run-{n}")
        StageLogger(uri, run, "dpo_model").params({"lr": lr, "seed": seed, "beta": 0.1})
        tags = {"eval.dpo.bits_per_byte": str(bpb), "eval.dpo.kiln_next_line.acc": "0.21"}
        registry.register(uri, "test", run, _bundle(tmp_path, n), tags, gate_passed=True)
    profile = tmp_path / "test.yaml"
    profile.write_text("base: tiny\n")
    base = ["--profile", str(profile), "--tracking-uri", uri]

    assert main(["seeds", *base]) == 0
    assert "no seed spread recorded" in capsys.readouterr().out
    assert main(["seeds", "1", "2", "4", *base]) == 2
    assert capsys.readouterr().err.strip() == (
        "kiln: error: versions 1 and 4 differ in dpo_model.lr (0.0005 vs 0.005): a seed spread needs re-trains "
        "of one recipe, differing only in seeds"
    )
    assert main(["seeds", "1", "candidate", "3", "3", *base]) == 2  # candidate is version 4
    assert "dpo_model.lr" in capsys.readouterr().err
    assert main(["seeds", "1", "2", "2", *base]) == 2
    assert "at least 3 different versions" in capsys.readouterr().err

    assert main(["seeds", "1", "2", "3", *base]) == 0
    shown = capsys.readouterr().out
    assert "seed spread of versions 1, 2, 3" in shown
    row = next(line for line in shown.splitlines() if line.startswith("eval.dpo.bits_per_byte "))
    assert row.split()[1] == "0.02517"  # the standard deviation of 2.37, 2.35, 2.40
    assert next(line for line in shown.splitlines() if line.startswith("eval.dpo.kiln_next_line.acc")).split()[1] == "0"
    assert main(["seeds", *base]) == 0  # shown again, as recorded
    assert capsys.readouterr().out == shown

    result = compare(uri, "test", ["1", "4"], speed_repeats=0)
    assert result["seed_spread"]["versions"] == ["1", "2", "3"]
    assert any("spread of 3 re-trains" in n for n in result["notes"])
    alone = compare(uri, "test", ["1", "4"], speed_repeats=0, seeds=[])
    assert alone["seed_spread"] is None
    assert any("no seed spread used" in n for n in alone["notes"])
    assert main(["compare", "1", "4", "--speed-repeats", "0", "--seeds", "1,2,4", *base]) == 2
    assert "differ in dpo_model.lr" in capsys.readouterr().err
