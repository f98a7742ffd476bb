"""The whole loop on a test-sized profile: serve version 1, trace and judge its answers, run the
new_feedback sensor's job, and find the judgements in a new candidate version's DPO figures.

One pipeline run registers version 1 (promoted to production); a gateway serves it with real
llama-server replicas and traces into the same sqlite store; requests go through the OpenAI
client and /infer (prompts with personal data among them); ratings, a preferred answer and
side-by-side picks are posted; the sensor's job then makes feedback_pairs, dpo_data, DPO,
evaluation and version 2. Skipped, saying why, without a built llama-server.
"""

from __future__ import annotations

import json
import time

import pytest
import yaml
from dagster import DagsterInstance, Definitions, RunRequest, build_sensor_context, materialize
from served import Gateway, llama_server_or_skip
from test_assets import E2E_PROFILE, write_e2e_sources

import definitions
from pipeline.data.feedback import tracing_client
from pipeline.data.pii_scan import pii_left
from pipeline.io import read_jsonl
from pipeline.release import registry
from pipeline.serve.tracing import TRACE_HEADER
from pipeline.tracking import client
from resources import KilnSettings, MLflowTracking
from resources.logs import kiln_console

pytestmark = pytest.mark.slow

# test_assets' test-sized profile; a test-sized model moves its figures by chance from run to run, and
# the gate is not what is tested here
PROFILE = {**E2E_PROFILE, "registry": {"max_regression": 10.0, "max_score_drop": 1.0}}
EMAIL, PHONE = "jane.roe@example.com", "010-1234-5678"


@pytest.fixture(scope="module")
def version_one(tmp_path_factory):
    """Every asset materialized once (version 1, then promoted) and the resources they used."""
    llama_server_or_skip()
    root = tmp_path_factory.mktemp("loop")
    write_e2e_sources(root / "src")
    profile = root / "loop.yaml"
    profile.write_text(
        yaml.safe_dump({**PROFILE, "corpus": {"sources": [{"path": str(root / "src")}], "max_bytes": None}})
    )
    uri = f"sqlite:///{root / 'mlflow.db'}"
    resources = {
        "kiln": KilnSettings(profile=str(profile), work_dir=str(root / "work")),
        "mlflow": MLflowTracking(tracking_uri=uri, system_metrics=False),
    }
    instance = DagsterInstance.ephemeral()
    result = materialize(
        [*definitions.defs.assets, *definitions.defs.asset_checks], resources=resources, instance=instance
    )
    assert result.success
    registry.promote(uri, "loop", "1")
    return root, uri, resources, instance


def _chat(oai, prompt: str, max_tokens: int) -> tuple[str, str]:
    raw = oai.chat.completions.with_raw_response.create(
        model="kiln", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        # greedy and every answer as long as asked: two lengths, two different answers, every run the same
        extra_body={"ignore_eos": True, "preset": "greedy"},
    )  # fmt: skip
    return raw.headers[TRACE_HEADER], raw.parse().choices[0].message.content


def test_served_answers_and_feedback_become_a_new_candidate(version_one, monkeypatch):
    import openai

    from pipeline.serve.server import registry_target

    root, uri, resources, instance = version_one
    monkeypatch.setenv("KILN_LLAMA_SERVER", str(llama_server_or_skip()))
    monkeypatch.setenv("KILN_CACHE_DIR", str(root / "cache"))
    # the loop is under test, not the writer's priority: idle, it may not run at all on a busy machine
    monkeypatch.setenv("KILN_TRACE_NICE", "0")
    gw = Gateway(registry_target(uri, "loop", "production", "Q4_K_M"), kiln_replicas=1)
    try:
        oai = openai.OpenAI(base_url=gw.url + "/v1", api_key="none")
        prompts = ["def add(a, b):", f"mail {EMAIL} about the table", "def mul(a, b):", f"call {PHONE} now"]
        answers = {p: [_chat(oai, p, 6), _chat(oai, p, 12)] for p in prompts}
        infer = [
            gw.client.post("/infer", json={"query": "the river", "max_length": n, "preset": "greedy"}) for n in (4, 9)
        ]
        infer_ids = [r.headers[TRACE_HEADER] for r in infer]
        # judge the answers once their traces are stored
        deadline = time.monotonic() + 600
        while gw.metric("kiln_traces_written_total") + gw.metric("kiln_traces_dropped_total") < 10:
            assert time.monotonic() < deadline, "the 10 traces were not written within 10 minutes"
            time.sleep(0.2)
        (a1, _), (b1, _) = answers[prompts[0]]
        (a2, _), (b2, _) = answers[prompts[1]]
        (a3, _), _ = answers[prompts[2]]
        (a4, _), (b4, _) = answers[prompts[3]]
        judgements = [
            {"trace_id": a1, "rating": "up"}, {"trace_id": b1, "rating": "down"},  # rated, same prompt
            {"trace_id": b2, "better_than": a2}, {"trace_id": b2, "better_than": a2},  # a pick, posted twice
            {"trace_id": a3, "rating": 1, "preferred_answer": f"def mul(a, b):\n    return a * b  # {EMAIL}"},
            {"trace_id": a4, "better_than": b4},
            {"trace_id": infer_ids[0], "rating": 5}, {"trace_id": infer_ids[1], "rating": "down"},
        ]  # fmt: skip
        for body in judgements:
            r = gw.client.post("/v1/feedback", json=body)
            assert r.status_code == 200, r.text
        assert gw.metric('kiln_traces_dropped_total{reason="queue_full"}') == 0
    finally:
        gw.close()

    # the traces: masked text, the version and alias served, the feedback
    tc = tracing_client(uri)
    chat = tc.get_trace(a2)
    assert chat.data.spans[0].inputs["messages"][0]["content"] == "mail <EMAIL> about the table"
    assert chat.info.trace_metadata["kiln.version"] == "1"
    assert chat.info.trace_metadata["kiln.alias"] == "production"
    assert [(a.name, a.value) for a in chat.info.assessments] == [("pairwise", "rejected")] * 2
    assert tc.get_trace(infer_ids[0]).data.spans[0].inputs == {"prompt": "the river"}

    # the sensor counts 9 judgements: 5 ratings, 1 preferred answer, 3 picks (a pick once, not per trace)
    sensor = next(s for s in definitions.defs.sensors if s.name == "new_feedback")
    monkeypatch.setenv("KILN_FEEDBACK_MIN", "10")
    with build_sensor_context(resources=resources, instance=instance) as ctx:
        ticked = sensor.evaluate_tick(ctx)
    assert not ticked.run_requests
    assert "9 new judgements" in ticked.skip_message
    monkeypatch.setenv("KILN_FEEDBACK_MIN", "9")
    with build_sensor_context(resources=resources, instance=instance) as ctx:
        ticked = sensor.evaluate_tick(ctx)
        (request,) = ticked.run_requests
        assert isinstance(request, RunRequest)
        assert ticked.cursor
    with build_sensor_context(resources=resources, instance=instance, cursor=ticked.cursor) as ctx:
        assert isinstance(sensor.evaluate_tick(ctx).skip_message, str)  # nothing new since that run

    # the sensor's job: feedback_pairs -> dpo_data -> DPO -> evaluation -> version 2
    defs = Definitions(assets=definitions.defs.assets, asset_checks=definitions.defs.asset_checks,
                       jobs=[definitions.feedback_retrain_job], resources=resources,
                       loggers={"console": kiln_console})  # fmt: skip
    run = defs.get_job_def("feedback_retrain").execute_in_process(instance=instance, tags=request.tags)
    assert run.success
    meta = {
        e.asset_key.path[-1]: e.event_specific_data.materialization.metadata
        for e in run.get_asset_materialization_events()
    }

    layout = resources["kiln"].layout
    pairs = list(read_jsonl(layout.feedback_pairs / "pairs.jsonl"))
    reasons = sorted(p["reason"] for p in pairs)
    assert reasons == ["pairwise", "pairwise", "preferred_answer", "rated_same_prompt", "rated_same_prompt"]
    assert meta["feedback_pairs"]["new_pairs"].value == 5
    assert meta["feedback_pairs"]["dropped_pairs"].value == 1
    by_reason = {p["reason"]: p for p in pairs}
    assert by_reason["preferred_answer"]["trace_ids"] == [a3]
    assert by_reason["preferred_answer"]["chosen"][0]["content"].endswith("# <EMAIL>")
    assert {tuple(p["trace_ids"]) for p in pairs if p["reason"] == "pairwise"} == {(b2, a2), (a4, b4)}
    for p in pairs:
        assert not any(pii_left(m["content"]) for part in ("prompt", "chosen", "rejected") for m in p[part])

    dpo = layout.post_data("dpo")
    rows = [*read_jsonl(dpo / "train.jsonl"), *read_jsonl(dpo / "eval.jsonl")]
    for p in pairs:
        assert {k: p[k] for k in ("prompt", "chosen", "rejected")} in rows
    held = list(read_jsonl(dpo / "eval_feedback.jsonl"))
    assert held
    assert meta["dpo_data"]["feedback_pairs"].value == 5
    assert meta["dpo_model"]["held_out_feedback_pairs"].value == len(held)
    for key in ("preference_accuracy_feedback_before", "preference_accuracy_feedback_after"):
        assert 0 <= meta["dpo_model"][key].value <= 1

    versions = registry.list_versions(uri, "loop")
    assert [(v["version"], v["aliases"]) for v in versions] == [("1", "production"), ("2", "candidate")]
    mv = client(uri).get_model_version("kiln-loop", "2")
    figures = client(uri).get_run(mv.run_id).data.metrics
    assert (
        figures["dpo_model.preference_accuracy_feedback_before"]
        == meta["dpo_model"]["preference_accuracy_feedback_before"].value
    )
    assert "dpo_model.preference_accuracy_feedback_after" in figures
    assert json.loads((layout.feedback_pairs / "stats.json").read_text())["pairs"] == 5
