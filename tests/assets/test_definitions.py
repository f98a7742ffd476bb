"""The code location as definitions.py declares it, read without materializing anything: a removed,
renamed or rewired asset, check, job, schedule or sensor fails here, in about a second."""

import pytest
from dagster import Definitions

import definitions

GROUPS = {
    "raw_corpus": "data",
    "clean_corpus": "data",
    "feedback_pairs": "data",
    "tokenizer": "training",
    "base_model": "training",
    "sft_data": "post_training",
    "dpo_data": "post_training",
    "sft_model": "post_training",
    "dpo_model": "post_training",
    "eval_report": "evaluation",
    "gguf_model": "release",
    "gguf_benchmark": "release",
    "sampling_preset": "release",
    "registered_model": "release",
}

# asset -> the assets it reads: the edges of the graph
UPSTREAM = {
    "raw_corpus": set(),
    "clean_corpus": {"raw_corpus"},
    "tokenizer": {"clean_corpus"},
    "base_model": {"tokenizer"},
    "sft_data": {"clean_corpus"},
    "feedback_pairs": set(),
    "dpo_data": {"clean_corpus", "base_model", "feedback_pairs"},
    "sft_model": {"base_model", "sft_data"},
    "dpo_model": {"sft_model", "dpo_data"},
    "gguf_model": {"dpo_model"},
    "gguf_benchmark": {"gguf_model", "clean_corpus"},
    # after gguf_benchmark so the two CPU-heavy steps never run side by side
    "eval_report": {"base_model", "sft_model", "dpo_model", "gguf_benchmark", "clean_corpus"},
    # after eval_report too: tuning and evaluation are both CPU-heavy
    "sampling_preset": {"gguf_model", "eval_report"},
    "registered_model": {"gguf_benchmark", "sampling_preset", "eval_report"},
}

# check -> the asset it gates
CHECKS = {
    "clean_corpus_not_empty": "clean_corpus",
    "clean_corpus_pii_free": "clean_corpus",
    "tokenizer_round_trip": "tokenizer",
    "base_model_beats_unigram": "base_model",
    "base_model_parameter_budget": "base_model",
    "gguf_parity": "gguf_benchmark",
    "eval_gate": "eval_report",
}

# job -> the assets it materializes
JOBS = {
    "kiln_pipeline": set(GROUPS),
    "data": {"raw_corpus", "clean_corpus", "feedback_pairs"},
    "training": {"tokenizer", "base_model"},
    "post_training": {"sft_data", "dpo_data", "sft_model", "dpo_model"},
    "evaluation": {"eval_report"},
    "release": {"gguf_model", "gguf_benchmark", "sampling_preset", "registered_model"},
    "feedback_retrain": {
        "feedback_pairs", "sft_data", "dpo_data", "sft_model", "dpo_model", "eval_report",
        "gguf_model", "gguf_benchmark", "sampling_preset", "registered_model",
    },
}  # fmt: skip

defs = definitions.defs


@pytest.fixture(scope="module")
def asset_specs():
    return [spec for assets_def in defs.assets for spec in assets_def.specs]


def test_asset_keys_and_their_groups(asset_specs):
    assert {s.key.to_user_string(): s.group_name for s in asset_specs} == GROUPS


def test_each_asset_reads_what_it_should(asset_specs):
    edges = {s.key.to_user_string(): {d.asset_key.to_user_string() for d in s.deps} for s in asset_specs}
    assert edges == UPSTREAM


def test_each_check_gates_its_asset_and_blocks_what_follows():
    specs = [spec for checks_def in defs.asset_checks for spec in checks_def.check_specs]
    assert {s.name: s.asset_key.to_user_string() for s in specs} == CHECKS
    assert all(s.blocking for s in specs)  # a failed check stops the assets downstream of it


def test_each_job_selects_its_group():
    graph = defs.resolve_asset_graph()
    selected = {job.name: {k.to_user_string() for k in job.selection.resolve(graph)} for job in defs.jobs}
    assert selected == JOBS


def test_the_schedule_and_the_sensors_and_what_they_run():
    assert [(s.name, s.job_name) for s in defs.schedules] == [("weekly_retrain", "kiln_pipeline")]
    assert [(s.name, s.job_name) for s in defs.sensors] == [
        ("new_raw_data", "kiln_pipeline"),
        ("new_feedback", "feedback_retrain"),
    ]


def test_the_code_location_loads():
    Definitions.validate_loadable(defs)  # what `dagster dev` does when it loads workspace.yaml
    assert set(defs.resources) == {"kiln", "mlflow"}


def test_kiln_runs_every_job_in_one_process_and_any_asset_may_be_forced():
    from dagster import validate_run_config

    from pipeline.cli.run import IN_PROCESS

    for job in ("kiln_pipeline", "data", "release"):
        config = validate_run_config(defs.resolve_job_def(job), IN_PROCESS)
        assert list(config["execution"]["multi_or_in_process_executor"]) == ["in_process"]
    forced = {"ops": {name: {"config": {"force": True}} for name in set(GROUPS) - {"raw_corpus"}}}
    config = validate_run_config(defs.resolve_job_def("kiln_pipeline"), forced)
    assert config["ops"]["sft_model"]["config"] == {"force": True}


def test_max_concurrent_runs_steps_in_processes_and_accelerator_steps_one_at_a_time():
    from dagster import validate_run_config

    from pipeline.cli.run import IN_PROCESS, execution_config
    from pipeline.config import RunSettings
    from pipeline.errors import KilnError

    assert execution_config(1) == IN_PROCESS
    assert RunSettings().max_concurrent == 1
    job = defs.resolve_job_def("kiln_pipeline")
    config = validate_run_config(job, execution_config(3))
    multiprocess = config["execution"]["multi_or_in_process_executor"]["multiprocess"]
    assert multiprocess["max_concurrent"] == 3
    assert multiprocess["tag_concurrency_limits"] == [{"key": "kiln/compute", "value": "accelerator", "limit": 1}]
    compute = {node.name: node.definition.tags.get("kiln/compute") for node in job.graph.nodes}
    heavy = {"base_model", "sft_model", "dpo_data", "dpo_model", "gguf_model", "gguf_benchmark", "sampling_preset"}
    assert {name for name, tag in compute.items() if tag == "accelerator"} == heavy
    # what may overlap: sft_data (light) beside the tokenizer and pretraining, which it does not wait for
    assert compute["sft_data"] == compute["tokenizer"] == "cpu"
    assert "base_model" not in UPSTREAM["sft_data"]
    with pytest.raises(KilnError, match="run.max_concurrent must be at least 1"):
        RunSettings(max_concurrent=0)
