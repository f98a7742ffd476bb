"""Structured logs: the JSON lines that `KILN_LOG_FORMAT=json` gives, parsed and checked field by field."""

import json
import logging
import os
import subprocess
import sys

import pytest
import yaml

from pipeline import logs
from pipeline.layout import REPO_ROOT
from pipeline.serve.inference import Call
from pipeline.serve.metrics import Metrics


@pytest.fixture
def json_lines(capsys):
    """Configure JSON logs; returns a function giving the lines logged so far, parsed."""
    import structlog

    logs.configure("json")
    yield lambda: [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    logging.getLogger().removeHandler(next(h for h in logging.getLogger().handlers if getattr(h, "kiln", False)))
    logging.getLogger("kiln.training").setLevel(logging.NOTSET)
    structlog.contextvars.clear_contextvars()  # the run and stage bound here are not the next test's


def test_every_line_has_a_type_a_time_a_run_and_a_stage(json_lines):
    logs.bind(run_id="run-1", stage="clean_corpus")
    logs.get("system").info("started", files=3)
    logging.getLogger("some.library").warning("disk %s is slow", "/data")
    first, second = json_lines()
    assert first["type"] == "system"
    assert first["event"] == "started"
    assert first["files"] == 3
    assert first["run_id"] == "run-1"
    assert first["stage"] == "clean_corpus"
    assert first["level"] == "info"
    assert first["timestamp"].endswith("Z")
    assert second["event"] == "disk /data is slow"
    assert second["type"] == "system"
    assert second["level"] == "warning"
    assert second["run_id"] == "run-1"  # plain logging records carry the run too


def test_a_served_request_is_one_inference_line(json_lines):
    call = Call(route="/infer", query="def fib(n):")
    call.prompt_tokens, call.completion_tokens, call.replica, call.version = 5, 12, "r0", "3"
    call.started -= 2.5  # as if it had started 2.5 s ago: total_ms counts from there
    call.finish(Metrics())
    [line] = [x for x in json_lines() if x["type"] == "inference"]
    assert line["event"] == "request"
    assert line["request_id"] == call.request_id
    assert (line["route"], line["status"], line["prompt_tokens"], line["completion_tokens"]) == ("/infer", 200, 5, 12)
    assert 2500 <= line["total_ms"] < 2500 + 60_000
    assert line["version"] == "3"


def test_the_dagster_stage_stamps_its_run_and_stage(json_lines, tmp_path):
    from resources import MLflowTracking

    tracking = MLflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", system_metrics=False)
    with tracking.stage("dagster-run-7", "tiny", "tokenizer"):
        logs.get("training").info("vocabulary", size=400)
    [line] = [x for x in json_lines() if x["event"] == "vocabulary"]
    assert (line["type"], line["run_id"], line["stage"]) == ("training", "dagster-run-7", "tokenizer")
    assert line["size"] == 400


@pytest.mark.slow
def test_kiln_pretrain_logs_every_step_as_json(small_corpus, tiny_base, tmp_path):
    """The real command: one `training` line per step with its loss, lr and tokens/s, one per evaluation."""
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump({
        "base": "tiny", "name": "logs",
        "model": {"hidden_size": 256, "intermediate_size": 256, "num_layers": 1, "num_heads": 4, "num_kv_heads": 2},
        "pretrain": {"seq_len": 32, "micro_batch": 2, "steps": 4, "warmup_steps": 1, "eval_every": 2,
                     "eval_batches": 1},
        "eval": {"max_new_tokens": 16},
    }))  # fmt: skip
    folders = ["--clean", str(small_corpus.parent), "--tokenizer", str(tiny_base.parent / "tok")]
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "pretrain",
        *folders,
        "-o",
        str(tmp_path / "out"),
        "--profile",
        str(profile),
    ]
    env = {**os.environ, "KILN_LOG_FORMAT": "json", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(x) for x in done.stderr.splitlines() if x.startswith("{")]
    assert "base_model:" not in done.stderr  # no progress bar running into the JSON lines
    steps = [x for x in lines if x["type"] == "training" and x["event"] == "step"]
    assert [x["step"] for x in steps] == [1, 2, 3, 4]
    for x in steps:
        assert x["stage"] == "pretrain"
        assert x["run_id"]
        assert x["timestamp"]
        assert x["loss"] > 0
        assert x["lr"] >= 0
        assert x["tokens_per_s"] > 0
    assert len({x["run_id"] for x in lines}) == 1
    assert [x["step"] for x in lines if x["event"] == "evaluation"] == [2, 4]


def test_dagster_run_logs_become_structured_lines(json_lines):
    """A real Dagster run with kiln's console logger: its events and an op's `context.log` as JSON."""
    from dagster import job, op

    from resources.logs import kiln_console

    @op
    def count_documents(context):
        context.log.info("counted 12 documents")

    @job(logger_defs={"console": kiln_console}, config={"loggers": {"console": {}}})
    def tiny_job():
        count_documents()

    result = tiny_job.execute_in_process()
    lines = [x for x in json_lines() if x.get("job") == "tiny_job"]
    [said] = [x for x in lines if x["event"] == "counted 12 documents"]
    assert (said["run_id"], said["stage"], said["type"], said["level"]) == (
        result.run_id,
        "count_documents",
        "system",
        "info",
    )
    assert {"STEP_START", "STEP_SUCCESS", "PIPELINE_SUCCESS"} <= {x["dagster_event"] for x in lines}


def test_the_code_location_logs_through_kiln():
    import definitions
    from resources.logs import kiln_console

    assert definitions.defs.loggers["console"] is kiln_console
    for job in ("kiln_pipeline", "data", "training", "release"):
        job_def = definitions.defs.resolve_job_def(job)
        assert job_def.loggers["console"] is kiln_console
        assert job_def.run_config == {"loggers": {"console": {}}}  # used when a run names no loggers
