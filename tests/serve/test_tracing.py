"""Served answers as MLflow traces, users' feedback on them, and the playground page.

The writer's own tests use a real sqlite tracking store in tmp_path; the gateway tests serve the
test-sized GGUF with real llama-server replicas (skipped, saying why, without a built one). The
playground's browser test is in test_playground.py.
"""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from child import run_python
from prometheus_client import CollectorRegistry
from served import Gateway, sse_data

from pipeline.data.feedback import FEEDBACK_TAG, serving_experiment, tracing_client
from pipeline.data.pii_scan import pii_left
from pipeline.serve.settings import ServeSettings
from pipeline.serve.tracing import TRACE_HEADER, TraceRecord, TraceWriter, answer_of, new_trace_id
from tests.serve.conftest import wait_for

EMAIL, PHONE = "jane.roe@example.com", "010-1234-5678"


def _record(trace_id: str, **over) -> TraceRecord:
    fields = dict(
        trace_id=trace_id, route="/v1/completions", request_id="r1", key_id="abcd1234", status=200,
        started_ns=time.time_ns(), total_ms=12.0, queue_ms=0.5, ttft_ms=3.0, prompt_tokens=4, completion_tokens=2,
        preset="default", sent={"prompt": "hi <EMAIL>", "temperature": 0.7}, model="kiln-unit", version="1",
        alias="production", role="production", answer={"object": "text_completion", "choices": [
            {"index": 0, "text": f"mail {EMAIL}", "finish_reason": "length"}]},
    )  # fmt: skip
    return TraceRecord(**{**fields, **over})


def _traces(uri: str, model: str) -> dict:
    from pipeline.tracking import client

    exp = client(uri).get_experiment_by_name(serving_experiment(model))
    if exp is None:
        return {}
    return {t.info.trace_id: t for t in tracing_client(uri).search_traces(locations=[exp.experiment_id])}


# ---------------------------------------------------------------- pieces without a replica


pytestmark = pytest.mark.usefixtures("writer_at_normal_priority")  # tests/serve/conftest.py


def test_answers_are_read_from_json_and_from_streams():
    native = b'data: {"content":"Hel","stop":false}\n\ndata: {"content":"lo","stop":true,"stop_type":"limit"}\n\n'
    record = _record(new_trace_id(), answer=None, stream=native)
    assert answer_of(record) == ("Hello", ["Hello"], "length")
    chat = (
        b'data: {"choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null}]}\n\n'
        b'data: {"choices":[{"index":0,"delta":{"content":"b"},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
        b'data: {"choices":[{"index":0,"delta":{"content":"cut'  # the kept bytes may end inside an event
    )
    assert answer_of(_record(new_trace_id(), answer=None, stream=chat)) == ("ab", ["ab"], "stop")
    infer = {"generated_text": ["x", "y"]}
    sent = {"prompt": "p", "n_predict": 2}
    assert answer_of(_record(new_trace_id(), answer=infer, sent=sent, completion_tokens=4)) == (
        "x",
        ["x", "y"],
        "length",
    )


def test_the_writer_stores_masked_traces_and_counts_what_it_drops(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registry = CollectorRegistry()
    writer = TraceWriter(uri, sample=1.0, capacity=2, registry=registry, start=False)  # a store that takes nothing
    ids = [new_trace_id() for _ in range(3)]
    for trace_id in ids:
        writer.submit(_record(trace_id))  # never blocks: the third finds the queue full
    assert registry.get_sample_value("kiln_traces_dropped_total", {"reason": "queue_full"}) == 1
    writer.start()
    for trace_id in ids:
        assert writer.wait_written(trace_id, 600)
    writer.close()
    assert registry.get_sample_value("kiln_traces_written_total") == 2
    traces = _traces(uri, "kiln-unit")
    assert set(traces) == set(ids[:2])
    trace = traces[ids[0]]
    meta = trace.info.trace_metadata
    assert meta["kiln.route"] == "/v1/completions"
    assert meta["kiln.version"] == "1"
    assert meta["kiln.alias"] == "production"
    assert meta["kiln.key_id"] == "abcd1234"
    assert json.loads(meta["kiln.sampler"]) == {"temperature": 0.7}
    assert meta["kiln.finish_reason"] == "length"
    assert meta["kiln.completion_tokens"] == "2"
    root = trace.data.spans[0]
    assert root.inputs == {"prompt": "hi <EMAIL>"}
    assert root.outputs == {"text": "mail <EMAIL>"}  # masked before it was stored
    assert EMAIL not in json.dumps(trace.to_dict())


def test_a_store_that_is_down_costs_only_counted_traces(tmp_path):
    from pipeline.io import free_port

    registry = CollectorRegistry()
    writer = TraceWriter(f"http://127.0.0.1:{free_port()}", sample=1.0, capacity=8, registry=registry, priority="0")
    trace_id = new_trace_id()
    writer.submit(_record(trace_id))
    assert writer.wait_written(trace_id, 600)  # settled: dropped, since the store is down
    writer.close()
    assert registry.get_sample_value("kiln_traces_dropped_total", {"reason": "store_error"}) == 1
    assert registry.get_sample_value("kiln_traces_written_total") == 0


# ---------------------------------------------------------------- a gateway with real replicas


@pytest.fixture(scope="module")
def traced(env, ggufs, tmp_path_factory):  # env: tests/serve/conftest.py
    """A gateway on the test GGUF whose answers are traced into a sqlite store; API keys on."""
    from pipeline.serve.server import file_target

    uri = f"sqlite:///{tmp_path_factory.mktemp('traces') / 'mlflow.db'}"
    gw = Gateway(file_target(Path(ggufs["Q4_K_M"]), uri), kiln_api_keys="k1", kiln_replicas=1)
    gw.client.headers["Authorization"] = "Bearer k1"
    gw.uri, gw.model = uri, Path(ggufs["Q4_K_M"]).stem
    yield gw
    gw.close()


@pytest.mark.slow
def test_every_route_answers_with_its_trace_id_and_the_trace_holds_masked_text(traced):
    import openai

    oai = openai.OpenAI(base_url=traced.url + "/v1", api_key="k1")
    chat = oai.chat.completions.with_raw_response.create(
        model="x", messages=[{"role": "user", "content": f"write to {EMAIL}"}], max_tokens=6,
        extra_body={"ignore_eos": True, "preset": "greedy"},
    )  # fmt: skip
    chat_id = chat.headers[TRACE_HEADER]
    assert chat.parse().id == chat_id  # the OpenAI answer's id is the trace id
    infer = traced.client.post("/infer", json={"query": f"call {PHONE}", "max_length": 5})
    with traced.client.stream("POST", "/infer/stream", json={"query": "stream me", "max_length": 4}) as s:
        stream_id = s.headers[TRACE_HEADER]
        events = list(s.iter_lines())
    with traced.client.stream(
        "POST", "/v1/completions", json={"prompt": "def f(", "max_tokens": 4, "stream": True, "ignore_eos": True}
    ) as c:
        completion_id = c.headers[TRACE_HEADER]
        chunks = [e for e in sse_data(c) if e.get("choices")]
        streamed = "".join(e["choices"][0]["text"] for e in chunks)
    assert {e["id"] for e in chunks} == {completion_id}  # each streamed chunk's id is the trace id
    assert infer.status_code == 200
    assert any(e.startswith("event: done") for e in events)
    ids = [chat_id, infer.headers[TRACE_HEADER], stream_id, completion_id]
    assert len(set(ids)) == 4
    traced.flush(*ids)
    traces = _traces(traced.uri, traced.model)
    assert set(ids) <= set(traces)
    by_route = {traces[i].info.trace_metadata["kiln.route"]: traces[i] for i in ids}
    assert set(by_route) == {"/v1/chat/completions", "/infer", "/infer/stream", "/v1/completions"}
    chat_trace = by_route["/v1/chat/completions"]
    assert chat_trace.data.spans[0].inputs["messages"][-1]["content"] == "write to <EMAIL>"
    assert chat_trace.data.spans[0].outputs["text"] == chat.parse().choices[0].message.content
    assert chat_trace.info.trace_metadata["kiln.preset"] == "greedy"
    assert json.loads(chat_trace.info.trace_metadata["kiln.sampler"])["temperature"] == 0.0
    assert by_route["/infer"].data.spans[0].inputs == {"prompt": "call <PHONE>"}
    assert by_route["/infer"].data.spans[0].outputs["text"] == infer.json()["generated_text"]
    assert by_route["/v1/completions"].data.spans[0].outputs["text"] == streamed
    for trace in by_route.values():
        meta = trace.info.trace_metadata
        assert meta["kiln.version"] == "local"
        assert meta["kiln.status"] == "200"
        assert meta["kiln.key_id"]
        assert meta["kiln.key_id"] != "k1"
        assert int(meta["kiln.completion_tokens"]) > 0
        assert float(meta["kiln.total_ms"]) > 0
        assert not pii_left(json.dumps(trace.data.spans[0].to_dict()))
    assert traced.metric("kiln_traces_written_total") >= 4


@pytest.mark.slow
def test_feedback_is_stored_on_the_trace(traced):
    first = traced.client.post("/infer", json={"query": "one", "max_length": 3}).headers[TRACE_HEADER]
    second = traced.client.post("/infer", json={"query": "one", "max_length": 4}).headers[TRACE_HEADER]
    # stored first: the feedback route waits for a queued trace only FEEDBACK_WAIT_S (10 s), and a fresh
    # writer's first write (spawn, mlflow's import, the store's tables) took 11 s on a busy machine
    traced.flush(first, second)
    up = traced.client.post("/v1/feedback", json={"trace_id": first, "rating": "up", "comment": f"mail {EMAIL}"})
    assert up.status_code == 200, up.text
    down = traced.client.post(
        "/v1/feedback", json={"trace_id": second, "rating": 2, "preferred_answer": f"ask {EMAIL}"}
    )
    pick = traced.client.post("/v1/feedback", json={"trace_id": first, "better_than": second})
    assert down.status_code == 200
    assert pick.status_code == 200
    client = tracing_client(traced.uri)
    one, two = client.get_trace_info(first), client.get_trace_info(second)
    got = {(a.name, json.dumps(a.value)) for a in one.assessments}
    assert got == {("rating", '"up"'), ("pairwise", '"chosen"')}
    assert {(a.name, json.dumps(a.value)) for a in two.assessments} == {
        ("rating", "2"),
        ("preferred_answer", '"ask <EMAIL>"'),
        ("pairwise", '"rejected"'),
    }
    rationale = next(a.rationale for a in one.assessments if a.name == "rating")
    assert rationale == "mail <EMAIL>"
    assert one.tags[FEEDBACK_TAG]
    assert next(a for a in two.assessments if a.name == "pairwise").metadata == {"other_trace_id": first}
    assert next(a for a in one.assessments if a.name == "rating").source.source_type == "HUMAN"


@pytest.mark.slow
def test_feedback_mistakes_are_one_line(traced):
    unknown = traced.client.post("/v1/feedback", json={"trace_id": new_trace_id(), "rating": "up"})
    assert unknown.status_code == 404
    assert "no served trace" in unknown.json()["detail"]
    cases = {
        "not json": (b"{", "not valid JSON"),
        "no judgement": ({"trace_id": new_trace_id()}, "give a rating"),
        "bad rating": ({"trace_id": new_trace_id(), "rating": 9}, "rating 9"),
        "bad id": ({"trace_id": "tr-1", "rating": "up"}, "trace_id"),
        "unknown field": ({"trace_id": new_trace_id(), "rating": "up", "stars": 5}, "stars"),
    }
    for name, (body, says) in cases.items():
        kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = traced.client.post("/v1/feedback", **kwargs)
        assert r.status_code == 422, name
        detail = r.json()["detail"]
        assert isinstance(detail, str), (name, detail)
        assert "\n" not in detail, (name, detail)
        assert says in detail, (name, detail)
    anonymous = httpx.post(traced.url + "/v1/feedback", json={"trace_id": new_trace_id(), "rating": "up"})
    assert anonymous.status_code == 401  # the same guard as inference


@pytest.mark.slow
def test_sampling_zero_traces_nothing_and_a_store_down_fails_no_request(env, ggufs):
    from pipeline.io import free_port
    from pipeline.serve.server import file_target

    down = Gateway(file_target(Path(ggufs["Q4_K_M"]), f"http://127.0.0.1:{free_port()}"), kiln_replicas=1)
    try:
        answers = [down.client.post("/infer", json={"query": f"q{i}", "max_length": 2}) for i in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 200]
        down.flush(*(a.headers[TRACE_HEADER] for a in answers))
        assert down.metric('kiln_traces_dropped_total{reason="store_error"}') == 3
    finally:
        down.close()
    nowhere = "sqlite:////nonexistent/never.db"
    off = Gateway(file_target(Path(ggufs["Q4_K_M"]), nowhere), kiln_trace_sample=0, kiln_replicas=1)
    try:
        answer = off.client.post("/infer", json={"query": "q", "max_length": 2})
        assert answer.status_code == 200
        assert TRACE_HEADER not in answer.headers
    finally:
        off.close()


@pytest.mark.slow
def test_a_busy_refusal_and_a_fallback_answer_are_traced_too(env, ggufs, tmp_path):
    from pipeline.serve.server import file_target

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    gguf = Path(ggufs["Q4_K_M"])
    gw = Gateway(
        file_target(gguf, uri), kiln_replicas=1, max_concurrent_inference=1, kiln_max_queue=0,
        llm_fallback_response="try later",
    )  # fmt: skip
    body = {"prompt": "x", "max_tokens": 3}
    try:
        replica = gw.deployment.active.replicas[0]
        os.kill(replica.pid, signal.SIGSTOP)  # the only place is held by a request parked on it
        try:
            with ThreadPoolExecutor(1) as pool:
                parked = pool.submit(httpx.post, f"{gw.url}/v1/completions", json=body, timeout=120)
                wait_for(lambda: gw.app.state.kiln.admission.in_flight == 1, "the parked request holds the place")
                refused = gw.client.post("/v1/completions", json=body)
                os.kill(replica.pid, signal.SIGCONT)
                assert parked.result().status_code == 200
        finally:
            os.kill(replica.pid, signal.SIGCONT)
        # a replica that never sends a first token: a 503 (on any machine, however slow), answered with
        # the fallback text; the first-token wait shortened only now, so the parked request above waited
        gw.app.state.kiln.inference.first_token_s = 0.5
        os.kill(replica.pid, signal.SIGSTOP)
        try:
            fallback = gw.client.post("/v1/completions", json=body)
        finally:
            os.kill(replica.pid, signal.SIGCONT)
        assert refused.status_code == 429
        assert fallback.status_code == 200
        assert fallback.json()["fallback"] is True
        ids = refused.headers[TRACE_HEADER], fallback.headers[TRACE_HEADER]
        gw.flush(*ids)
    finally:
        gw.close()
    traces = _traces(uri, gguf.stem)
    busy, failed = (traces[i] for i in ids)
    assert busy.info.trace_metadata["kiln.status"] == "429"
    assert "busy" in busy.info.trace_metadata["kiln.error"]
    assert failed.info.trace_metadata["kiln.status"] == "503"
    assert failed.info.trace_metadata["kiln.error"]
    assert failed.data.spans[0].outputs["text"] == "try later"  # what the user got, beside why
    assert busy.info.state == failed.info.state == "ERROR"


def test_a_process_whose_writer_is_gone_still_exits(tmp_path):
    """Records the writer never read fill the queue's pipe; the process must exit all the same (its
    queue's feeder thread would otherwise block the interpreter's exit for good)."""
    script = (
        "import sys, time\n"
        "from prometheus_client import CollectorRegistry\n"
        "from pipeline.serve.tracing import TraceRecord, TraceWriter, new_trace_id\n"
        "writer = TraceWriter(sys.argv[1], sample=1.0, capacity=400, registry=CollectorRegistry(), start=False)\n"
        "for _ in range(400):\n"
        "    writer.submit(TraceRecord(trace_id=new_trace_id(), route='/infer', request_id='r', key_id=None,\n"
        "        status=200, started_ns=0, total_ms=1.0, queue_ms=0.0, ttft_ms=None, prompt_tokens=1,\n"
        "        completion_tokens=1, preset=None, sent={'prompt': 'x' * 1000}, model='m', version='1',\n"
        "        alias=None, role=None))\n"
        "writer.close()\n"
        "print('done', flush=True)\n"
    )
    code, out, err = run_python(
        script, f"sqlite:///{tmp_path / 'mlflow.db'}", timeout=300,
        hung="the process did not exit in 5 minutes: its queue's feeder thread blocked the exit",
    )  # fmt: skip
    assert code == 0, err[-800:]
    assert out.strip() == "done"


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is a Linux scheduling policy")
def test_the_writer_runs_only_on_idle_cores_unless_told_a_niceness():
    """KILN_TRACE_NICE: idle (the default) puts the writer under SCHED_IDLE, where niceness 19 still
    took a share of busy cores from the replicas; a number is a niceness."""
    script = (
        "import os, sys\n"
        "from pipeline.serve.tracing import lower_priority\n"
        "before = os.nice(0)\n"
        "lower_priority(sys.argv[1])\n"
        "print(os.sched_getscheduler(0), os.nice(0) - before)\n"
    )
    default = ServeSettings.model_fields["kiln_trace_nice"].default  # this module's gateways set "0"
    assert default == "idle"
    code, out, err = run_python(script, default, timeout=60, hung="the priority child hung")
    assert code == 0, err
    assert out.split() == [str(os.SCHED_IDLE), "0"]
    code, out, err = run_python(script, "7", timeout=60, hung="the priority child hung")
    assert code == 0, err
    assert out.split() == [str(os.SCHED_OTHER), "7"]
    with pytest.raises(ValueError, match="kiln_trace_nice"):
        ServeSettings(kiln_trace_nice="20")
