"""The corpus assets under Dagster: materialize raw_corpus -> clean_corpus into tmp_path."""

import json
import random

import pytest
import yaml
from dagster import DagsterInstance, Definitions, materialize

from assets.corpus import clean_corpus, clean_corpus_not_empty, clean_corpus_pii_free, raw_corpus
from resources import KilnSettings, MLflowTracking


def test_materialize_raw_to_clean(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(0)
    words = "model token stage corpus river table window engine signal garden market letter".split()

    def phrase(n):  # distinct documents: random word order defeats the near-duplicate filter
        return " ".join(rng.choice(words) + str(rng.randrange(50)) for _ in range(n))

    for i in range(30):
        body = "\n".join(f"    {w} = '{phrase(4)}'" for w in words)
        (src / f"mod{i}.py").write_text(f'"""{phrase(6)}."""\n\n\ndef f{i}():\n{body}\n    return locals()\n')
    notes = [f"{phrase(80)}. Reach the owner at owner{i}@example.com today." for i in range(30)]
    (src / "notes.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in notes))
    profile = tmp_path / "test.yaml"
    profile.write_text(
        yaml.safe_dump(
            {
                "base": "tiny",
                "corpus": {"sources": [{"path": str(src)}], "max_bytes": None, "code_share": None},
                "clean": {"validation_share": 0.2},
            }
        )
    )
    kiln = KilnSettings(profile=str(profile), work_dir=str(tmp_path / "work"))
    mlflow = MLflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", system_metrics=False)
    result = materialize(
        [raw_corpus, clean_corpus, clean_corpus_not_empty, clean_corpus_pii_free],
        resources={"kiln": kiln, "mlflow": mlflow},
    )
    assert result.success
    mats = {
        e.asset_key.path[-1]: e.event_specific_data.materialization.metadata
        for e in result.get_asset_materialization_events()
    }
    assert mats["raw_corpus"]["documents"].value == 60
    assert mats["clean_corpus"]["input_documents"].value == 60
    assert mats["clean_corpus"]["kept_documents"].value == 60
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"clean_corpus_not_empty": True, "clean_corpus_pii_free": True}
    stats = json.loads((tmp_path / "work" / "test" / "clean_corpus" / "stats.json").read_text())
    assert stats["pii"]["email"] == 30
    assert stats["input_documents"] == stats["kept_documents"] + sum(stats["dropped"].values())


def test_materialize_the_whole_pipeline_on_a_test_profile(tmp_path):
    """Every asset and check, sources to gguf_benchmark, on a test-sized profile."""
    from dagster import load_assets_from_modules

    import definitions
    from assets import corpus, evaluation, post_training, release, training

    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(1)
    words = "model token stage corpus river table window engine signal garden market letter".split()
    for i in range(60):
        lines = "\n".join(f"    v{j} = v{j - 1} * {rng.randrange(2, 9)} + {rng.randrange(99)}" for j in range(1, 6))
        doc = " ".join(rng.choice(words) for _ in range(8))
        (src / f"m{i}.py").write_text(f'def f{i}(v0):\n    """{doc}."""\n{lines}\n    return v5\n')
        (src / f"n{i}.txt").write_text(" ".join(rng.choice(words) + str(rng.randrange(9)) for _ in range(90)) + ".")
    profile = tmp_path / "e2e.yaml"
    profile.write_text(
        yaml.safe_dump(
            {
                "base": "tiny",
                "corpus": {"sources": [{"path": str(src)}], "max_bytes": None},
                "clean": {"validation_share": 0.15, "short_doc_keep": 1.0},
                "tokenizer": {"vocab_size": 400, "min_frequency": 1},
                "model": {"hidden_size": 256, "intermediate_size": 256, "num_layers": 1, "max_position": 512},
                "pretrain": {"seq_len": 64, "micro_batch": 4, "steps": 30, "warmup_steps": 2, "eval_every": 30},
                "sft": {"steps": 2, "batch": 2, "lora_r": 4, "max_length": 256},
                "dpo": {"steps": 2, "batch": 2, "lora_r": 4, "max_length": 256},
                "gguf": {"eval_tokens": 512, "window": 128, "quick": True},
                "eval": {
                    "bpb_max_bytes": 20_000,
                    "lm_eval_limit": 8,
                    "lm_eval_tasks": [],
                    "batch_size": 4,
                    "humaneval_problems": 2,
                    "max_new_tokens": 16,
                },  # fmt: skip
            }
        )
    )
    kiln = KilnSettings(profile=str(profile), work_dir=str(tmp_path / "work"))
    modules = [corpus, training, post_training, evaluation, release]
    assets = load_assets_from_modules(modules)
    checks = list(definitions.load_asset_checks_from_modules(modules))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    instance = DagsterInstance.ephemeral()
    resources = {"kiln": kiln, "mlflow": MLflowTracking(tracking_uri=uri, system_metrics=False)}
    result = materialize([*assets, *checks], resources=resources, instance=instance)
    assert result.success
    done = {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}
    assert done == {
        "raw_corpus",
        "clean_corpus",
        "tokenizer",
        "base_model",
        "sft_data",
        "dpo_data",
        "sft_model",
        "dpo_model",
        "gguf_model",
        "gguf_benchmark",
        "eval_report",
        "registered_model",
    }
    checks_passed = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert all(checks_passed.values()) and len(checks_passed) == 7
    assert (tmp_path / "work" / "e2e" / "gguf_model" / "kiln-e2e-Q4_K_M.gguf").exists()
    # one MLflow run holds every stage's figures; the version is registered as the candidate
    from pipeline.release import registry
    from pipeline.tracking import client

    runs = client(uri).search_runs([client(uri).get_experiment_by_name("kiln-e2e").experiment_id])
    assert len(runs) == 1
    metrics = runs[0].data.metrics
    assert {
        "base_model.val_bits_per_byte", "clean_corpus.kept_documents", "gguf_benchmark.Q4_K_M_size_bytes",
        "eval_report.base.bits_per_byte", "eval_report.dpo.kiln_body_choice.acc", "eval_report.dpo.humaneval.pass_at_1",
        "eval_report.dpo_Q4_K_M.humaneval.pass_at_1",
    } <= set(metrics)  # fmt: skip
    # the report: every model on every task, in the table and on disk
    report = json.loads((tmp_path / "work" / "e2e" / "eval_report" / "report.json").read_text())
    assert set(report["models"]) == {"base", "sft", "dpo", "dpo_Q4_K_M"}
    task_dir = tmp_path / "work" / "e2e" / "eval_report" / "lm_eval_tasks"
    rows = {t: len((task_dir / f"{t}.jsonl").read_text().splitlines()) for t in report["tasks"]}
    assert report["tasks"] == rows and rows["kiln_next_line"] == 8 and 4 <= rows["kiln_body_choice"] <= 8
    assert report["chance"]["kiln_next_line.acc"] == 0.25
    for model in ("base", "sft", "dpo"):
        assert 0 < report["models"][model]["bits_per_byte"] < 8
        assert 0 <= report["models"][model]["kiln_next_line.acc"] <= 1
    assert len(client(uri).get_metric_history(runs[0].info.run_id, "base_model.loss")) == 30  # the curve
    versions = registry.list_versions(uri, "e2e")
    assert [v["aliases"] for v in versions] == ["candidate"]
    tags = client(uri).get_model_version("kiln-e2e", "1").tags
    assert float(tags["eval.dpo.bits_per_byte"]) == pytest.approx(report["models"]["dpo"]["bits_per_byte"], rel=1e-5)

    # Staleness: a new DPO code version marks dpo_model stale, then what follows it; nothing upstream.
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
    from dagster._core.loader import LoadingContextForTest

    def stale(asset_defs):
        graph = Definitions(assets=asset_defs, resources=resources).resolve_asset_graph()
        resolver = CachingStaleStatusResolver(instance, graph, LoadingContextForTest(instance))
        return {k.path[-1] for k in graph.materializable_asset_keys if resolver.get_status(k) == StaleStatus.STALE}

    assert stale(assets) == set()
    changed = [
        a.map_asset_specs(lambda spec: spec.replace_attributes(code_version="2"))
        if a.key.path[-1] == "dpo_model"
        else a
        for a in assets
    ]
    assert stale(changed) == {"dpo_model"}  # upstream of it and beside it stay fresh
    # materializing the stale asset runs only it; its new data version then makes its direct
    # downstream stale (Dagster marks staleness one step at a time as each asset is re-run)
    rerun = materialize(changed, selection=["dpo_model"], resources=resources, instance=instance)
    assert {e.asset_key.path[-1] for e in rerun.get_asset_materialization_events()} == {"dpo_model"}
    assert stale(changed) == {"gguf_model", "eval_report"}
