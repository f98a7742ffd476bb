"""The assets under Dagster, materialized into a temporary folder on test-sized profiles.

The corpus assets run alone first. The rest share one run of every asset and check (the module
fixture `e2e`, about a minute and a half) and each test reads one side of its result.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from dagster import (
    AssetsDefinition,
    DagsterInstance,
    Definitions,
    ExecuteInProcessResult,
    load_asset_checks_from_modules,
    load_assets_from_modules,
    materialize,
)

from assets import corpus, evaluation, feedback, post_training, release, training
from assets.corpus import clean_corpus, clean_corpus_not_empty, clean_corpus_pii_free, raw_corpus
from pipeline.layout import QUANTS, Layout
from pipeline.release import registry
from pipeline.tracking import client
from resources import KilnSettings, MLflowTracking

pytestmark = pytest.mark.slow

WORDS = [
    "model",
    "token",
    "stage",
    "corpus",
    "river",
    "table",
    "window",
    "engine",
    "signal",
    "garden",
    "market",
    "letter",
]
STAGE_MODULES = [corpus, feedback, training, post_training, evaluation, release]
ASSETS = {
    "raw_corpus", "clean_corpus", "feedback_pairs", "tokenizer", "base_model", "sft_data", "dpo_data", "sft_model",
    "dpo_model", "gguf_model", "gguf_benchmark", "eval_report", "sampling_preset", "registered_model",
}  # fmt: skip


def write_profile(path: Path, profile: dict) -> Path:
    path.write_text(yaml.safe_dump(profile))
    return path


def materialized(result: ExecuteInProcessResult) -> set[str]:
    return {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}


def test_materialize_raw_to_clean(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(0)

    def phrase(n):  # distinct documents: random word order defeats the near-duplicate filter
        return " ".join(rng.choice(WORDS) + str(rng.randrange(50)) for _ in range(n))

    for i in range(30):
        body = "\n".join(f"    {w} = '{phrase(4)}'" for w in WORDS)
        (src / f"mod{i}.py").write_text(f'"""{phrase(6)}."""\n\n\ndef f{i}():\n{body}\n    return locals()\n')
    notes = [f"{phrase(80)}. Reach the owner at owner{i}@example.com today." for i in range(30)]
    (src / "notes.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in notes))
    profile = write_profile(
        tmp_path / "test.yaml",
        {
            "base": "tiny",
            "corpus": {"sources": [{"path": str(src)}], "max_bytes": None, "code_share": None},
            "clean": {"validation_share": 0.2},
        },
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
    for meta, key in ((mats["raw_corpus"], "by_lang"), (mats["clean_corpus"], "kept_by_lang")):
        assert sum(lang["documents"] for lang in meta[key].value.values()) == 60
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"clean_corpus_not_empty": True, "clean_corpus_pii_free": True}
    stats = json.loads((tmp_path / "work" / "test" / "clean_corpus" / "stats.json").read_text())
    assert stats["pii"]["email"] == 30
    assert stats["input_documents"] == stats["kept_documents"] + sum(stats["dropped"].values())


# Every stage at the smallest size that still trains, evaluates and exports something.
E2E_PROFILE = {
    "base": "tiny",
    "clean": {"validation_share": 0.15, "short_doc_keep": 1.0},
    "tokenizer": {"vocab_size": 400, "min_frequency": 1},
    "model": {"hidden_size": 256, "intermediate_size": 256, "num_layers": 1},
    # 128 positions: a mined function's prompt and the start of its answer (signature, docstring)
    # take about 80 of them, and a preference pair must differ within the trained length
    "pretrain": {"seq_len": 128, "micro_batch": 4, "steps": 30, "warmup_steps": 2, "eval_every": 30},
    "sft": {"steps": 2, "batch": 2, "lora_r": 4},  # max_length: the trained context, 128
    "dpo": {"steps": 2, "batch": 2, "lora_r": 4},
    "gguf": {"eval_tokens": 512, "quick": True},  # perplexity windows of the trained context
    "eval": {
        "bpb_max_bytes": 20_000, "lm_eval_limit": 8, "lm_eval_tasks": [], "batch_size": 4,
        "humaneval_problems": 2, "max_new_tokens": 16,
    },
    # no speed floor: on a busy machine a trial can run under any share of greedy's speed and be pruned,
    # and the end-to-end run is not about the floor (tests/release/test_tuning.py is)
    "tune": {"problems": 2, "trials": 2, "min_tokens_per_s": 0, "min_speed_share": 0, "space": {"max_tokens": [4, 8]}},
}  # fmt: skip


def write_e2e_sources(src: Path) -> None:
    """60 small Python functions with docstrings (for SFT and DPO pairs and the code tasks) and
    60 prose files."""
    src.mkdir()
    rng = random.Random(1)
    for i in range(60):
        lines = "\n".join(f"    v{j} = v{j - 1} * {rng.randrange(2, 9)} + {rng.randrange(99)}" for j in range(1, 6))
        doc = " ".join(rng.choice(WORDS) for _ in range(8))
        (src / f"m{i}.py").write_text(f'def f{i}(v0):\n    """{doc}."""\n{lines}\n    return v5\n')
        (src / f"n{i}.txt").write_text(" ".join(rng.choice(WORDS) + str(rng.randrange(9)) for _ in range(90)) + ".")


@dataclass
class PipelineRun:
    """One materialization of every asset and check, and where it wrote."""

    result: ExecuteInProcessResult
    work_dir: Path
    layout: Layout
    tracking_uri: str
    instance: DagsterInstance
    assets: list[AssetsDefinition]
    resources: dict


@pytest.fixture(scope="module")
def e2e(tmp_path_factory) -> PipelineRun:
    root = tmp_path_factory.mktemp("e2e")
    write_e2e_sources(root / "src")
    profile = write_profile(
        root / "e2e.yaml", {**E2E_PROFILE, "corpus": {"sources": [{"path": str(root / "src")}], "max_bytes": None}}
    )
    kiln = KilnSettings(profile=str(profile), work_dir=str(root / "work"))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    resources = {"kiln": kiln, "mlflow": MLflowTracking(tracking_uri=uri, system_metrics=False)}
    assets = list(load_assets_from_modules(STAGE_MODULES))
    checks = list(load_asset_checks_from_modules(STAGE_MODULES))
    instance = DagsterInstance.ephemeral()
    result = materialize([*assets, *checks], resources=resources, instance=instance)
    return PipelineRun(result, root / "work", kiln.layout, uri, instance, assets, resources)


def test_every_asset_materializes(e2e):
    assert e2e.result.success
    assert materialized(e2e.result) == ASSETS


def test_every_check_passes(e2e):
    checks_passed = {e.check_name: e.passed for e in e2e.result.get_asset_check_evaluations()}
    assert all(checks_passed.values())
    assert len(checks_passed) == 7


def test_the_artifacts_are_where_the_layout_names_them(e2e):
    assert (e2e.work_dir / "e2e" / "gguf_model" / "kiln-e2e-Q4_K_M.gguf").exists()
    layout = e2e.layout
    named = [
        layout.raw_corpus, layout.clean_splits, layout.clean_stats, layout.tokenizer, layout.tokenizer_stats,
        layout.base_summary, layout.base_metrics, *(layout.model_dir(k) for k in ("base", "sft", "dpo")),
        *(layout.adapter_dir(k) for k in ("sft", "dpo")), *(layout.post_data(k) / "eval.jsonl" for k in ("sft", "dpo")),
        *(layout.gguf(q) for q in QUANTS), layout.gguf_files, layout.benchmark_json, layout.eval_report,
        layout.eval_markdown, layout.humaneval_samples, layout.lm_eval_tasks,
    ]  # fmt: skip
    assert [p for p in named if not p.exists()] == []
    bundle = sorted(p.name for p in layout.bundle_dir.iterdir())
    assert bundle == [
        "MODEL_CARD.md",
        "benchmark.json",
        "clean_stats.json",
        "eval_report.json",
        "gguf",
        "hf",
        "presets.json",
        "profile.json",
    ]
    assert sorted(p.name for p in (layout.bundle_dir / "gguf").iterdir()) == sorted(layout.gguf(q).name for q in QUANTS)


def test_one_mlflow_run_holds_every_stage(e2e):
    c = client(e2e.tracking_uri)
    runs = c.search_runs([c.get_experiment_by_name("kiln-e2e").experiment_id])
    assert len(runs) == 1
    assert {
        "base_model.val_bits_per_byte", "clean_corpus.kept_documents", "gguf_benchmark.Q4_K_M_size_bytes",
        "eval_report.base.bits_per_byte", "eval_report.dpo.kiln_body_choice.acc", "eval_report.dpo.humaneval.pass_at_1",
        "eval_report.dpo_Q4_K_M.humaneval.pass_at_1", "sampling_preset.best_tokens_per_s",
    } <= set(runs[0].data.metrics)  # fmt: skip
    assert len(c.get_metric_history(runs[0].info.run_id, "sampling_preset.tokens_per_s")) == 2  # one point per trial
    assert len(c.get_metric_history(runs[0].info.run_id, "base_model.loss")) == 30  # the curve


def test_the_eval_report_scores_every_model_on_every_task(e2e):
    report = json.loads((e2e.work_dir / "e2e" / "eval_report" / "report.json").read_text())
    assert set(report["models"]) == {"base", "sft", "dpo", "dpo_Q4_K_M"}
    task_dir = e2e.work_dir / "e2e" / "eval_report" / "lm_eval_tasks"
    rows = {t: len((task_dir / f"{t}.jsonl").read_text().splitlines()) for t in report["tasks"]}
    assert report["tasks"] == rows
    assert rows["kiln_next_line"] == 8
    assert 4 <= rows["kiln_body_choice"] <= 8
    assert report["chance"]["kiln_next_line.acc"] == 0.25
    for model in ("base", "sft", "dpo"):
        assert 0 < report["models"][model]["bits_per_byte"] < 8
        assert 0 <= report["models"][model]["kiln_next_line.acc"] <= 1


def test_the_version_is_registered_as_the_candidate(e2e):
    uri = e2e.tracking_uri
    assert [v["aliases"] for v in registry.list_versions(uri, "e2e")] == ["candidate"]
    tags = client(uri).get_model_version("kiln-e2e", "1").tags
    presets = json.loads((e2e.layout.bundle_dir / "presets.json").read_text())
    assert tags["sha256.presets.json"] == registry.sha256(e2e.layout.bundle_dir / "presets.json")
    assert json.loads(tags["preset.code"]) == presets["code"]
    assert tags["presets"] == "balanced,code,greedy"
    report = json.loads(e2e.layout.eval_report.read_text())
    assert float(tags["eval.dpo.bits_per_byte"]) == pytest.approx(report["models"]["dpo"]["bits_per_byte"], rel=1e-5)


def stale_assets(instance: DagsterInstance, assets: list[AssetsDefinition], resources: dict) -> set[str]:
    """The assets Dagster's UI would show as stale. No public API answers this, so this is the
    one place that imports Dagster's private modules."""
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
    from dagster._core.loader import LoadingContextForTest

    graph = Definitions(assets=assets, resources=resources).resolve_asset_graph()
    resolver = CachingStaleStatusResolver(instance, graph, LoadingContextForTest(instance))
    return {k.path[-1] for k in graph.materializable_asset_keys if resolver.get_status(k) == StaleStatus.STALE}


def with_code_version(assets: list[AssetsDefinition], name: str, version: str) -> list[AssetsDefinition]:
    return [
        a.map_asset_specs(lambda spec: spec.replace_attributes(code_version=version)) if a.key.path[-1] == name else a
        for a in assets
    ]


def outcomes(result: ExecuteInProcessResult) -> dict[str, tuple[bool, str]]:
    """Each materialized asset: (reused, data version)."""
    out = {}
    for e in result.get_asset_materialization_events():
        m = e.event_specific_data.materialization
        out[e.asset_key.path[-1]] = (m.metadata["reused"].value, m.tags["dagster/data_version"])
    return out


# raw_corpus reads its sources and feedback_pairs the served traces every time; the registry decides
REUSING = ASSETS - {"raw_corpus", "feedback_pairs", "registered_model"}


def test_an_unchanged_rerun_reuses_every_stage_and_registers_nothing(e2e):
    again = materialize(e2e.assets, resources=e2e.resources, instance=e2e.instance)
    first, second = outcomes(e2e.result), outcomes(again)
    assert {a for a, (reused, _) in second.items() if reused} == REUSING
    assert second == {a: (a in REUSING, version) for a, (_, version) in first.items()}  # same data versions
    assert stale_assets(e2e.instance, e2e.assets, e2e.resources) == set()
    registered = again.asset_materializations_for_node("registered_model")[0].metadata
    assert registered["registered"].value is False
    assert registered["version"].value == 1
    assert [v["version"] for v in registry.list_versions(e2e.tracking_uri, "e2e")] == ["1"]
    reused_sft = again.asset_materializations_for_node("sft_model")[0].metadata
    computed_sft = e2e.result.asset_materializations_for_node("sft_model")[0].metadata
    assert reused_sft["sft_loss_merged"] == computed_sft["sft_loss_merged"]  # the stored figures, shown again
    assert reused_sft["reused_from_run"].value == e2e.result.run_id
    # the second run's MLflow run carries the reused stages' stored figures, tagged as reused
    c = client(e2e.tracking_uri)
    run = c.search_runs(
        [c.get_experiment_by_name("kiln-e2e").experiment_id], f"tags.`kiln.pipeline_run_id` = '{again.run_id}'"
    )[0]
    reused_base = again.asset_materializations_for_node("base_model")[0].metadata
    assert run.data.metrics["base_model.val_bits_per_byte"] == reused_base["val_bits_per_byte"].value
    assert run.data.tags["base_model.reused"] == "true"
    assert run.data.tags["eval_report.reused_from_run"] == e2e.result.run_id


def test_force_registers_a_new_version_of_the_same_model(e2e):
    force = {"ops": {"registered_model": {"config": {"force": True}}}}
    again = materialize(
        e2e.assets, selection=["registered_model"], resources=e2e.resources, instance=e2e.instance, run_config=force
    )
    assert again.asset_materializations_for_node("registered_model")[0].metadata["version"].value == 2
    assert [v["version"] for v in registry.list_versions(e2e.tracking_uri, "e2e")] == ["1", "2"]
    tags = [client(e2e.tracking_uri).get_model_version("kiln-e2e", v).tags for v in ("1", "2")]
    assert registry._model_part(tags[0]) == registry._model_part(tags[1]) != {}  # the same files, twice


# Last in the file: it materializes dpo_model again (a second Dagster run, so a second MLflow run).
def test_a_new_code_version_makes_only_what_follows_stale(e2e):
    assert stale_assets(e2e.instance, e2e.assets, e2e.resources) == set()
    changed = with_code_version(e2e.assets, "dpo_model", "bumped")
    assert stale_assets(e2e.instance, changed, e2e.resources) == {"dpo_model"}  # upstream and beside stay fresh
    # materializing the stale asset runs only it; its new data version then makes its direct
    # downstream stale (Dagster marks staleness one step at a time as each asset is re-run)
    rerun = materialize(changed, selection=["dpo_model"], resources=e2e.resources, instance=e2e.instance)
    assert materialized(rerun) == {"dpo_model"}
    assert outcomes(rerun)["dpo_model"][0] is False  # a new code version computes again
    assert stale_assets(e2e.instance, changed, e2e.resources) == {"gguf_model", "eval_report"}


# After the code-version test: these change what the tokenizer is trained on and with.
def test_a_changed_setting_or_upstream_file_computes_the_stage_again(e2e, tmp_path):
    def tokenizer_run(resources):
        run = materialize(e2e.assets, selection=["tokenizer"], resources=resources, instance=e2e.instance)
        return outcomes(run)["tokenizer"]

    assert tokenizer_run(e2e.resources)[0] is True
    variant = yaml.safe_load(Path(e2e.resources["kiln"].profile).read_text())
    variant["tokenizer"]["vocab_size"] = 420
    profile = write_profile(tmp_path / "variant.yaml", {**variant, "name": "e2e"})
    changed = {**e2e.resources, "kiln": KilnSettings(profile=str(profile), work_dir=str(e2e.work_dir))}
    reused, version = tokenizer_run(changed)
    assert reused is False
    assert json.loads(e2e.layout.tokenizer_stats.read_text())["vocab_size"] == 420
    assert tokenizer_run(changed) == (True, version)  # the new result is the stored one now
    train = next(e2e.layout.clean_splits.glob("train-*.jsonl"))
    train.write_text(train.read_text() + json.dumps({"id": "new", "text": "def added():\n    return 1\n"}) + "\n")
    reused, newer = tokenizer_run(changed)
    assert reused is False
    assert newer != version
