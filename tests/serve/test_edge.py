"""What a client meets at the gateway's edge: OpenAI's error bodies (and the `openai` client's typed
exceptions), body and message limits, PII masking of every text a chat request carries, trust in
X-Forwarded-For, key hashes, failed-auth limits, replicas nobody else can reach, full non-streamed answers."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from types import SimpleNamespace

import httpx
import pytest

from pipeline.errors import KilnError
from pipeline.serve.edge import TrustedProxies, error_body
from pipeline.serve.guards import Auth, Rejected, route_limits
from pipeline.serve.inference import assemble, merge_answers, prepare_text
from pipeline.serve.settings import load_settings

# ---------------------------------------------------------------- pieces without a replica


def test_error_bodies_are_openai_shaped_on_v1_and_kiln_shaped_elsewhere():
    body = error_body("/v1/chat/completions", 429, "server busy")
    assert body["error"] == {"message": "server busy", "type": "rate_limit_error", "param": None,
                             "code": "rate_limit_exceeded"}  # fmt: skip
    assert error_body("/v1/completions", 503, "down")["error"]["type"] == "server_error"
    assert error_body("/infer", 429, "server busy") == {"detail": "server busy"}


def test_forwarded_for_counts_only_from_a_trusted_proxy():
    proxies = TrustedProxies("10.0.0.0/8, 127.0.0.2")
    assert proxies.client("127.0.0.1", "1.2.3.4") == "127.0.0.1"  # not a proxy: the header is ignored
    assert proxies.client("127.0.0.2", "1.2.3.4") == "1.2.3.4"
    assert (
        proxies.client("10.1.1.1", "6.6.6.6, 1.2.3.4, 10.2.2.2") == "1.2.3.4"
    )  # the first untrusted hop from the right
    assert TrustedProxies("").client("127.0.0.1", "1.2.3.4") == "127.0.0.1"


def test_api_keys_as_sha256_hashes_and_route_limits(monkeypatch):
    auth = Auth(set(), set(), {hashlib.sha256(b"s3cret").hexdigest()})
    assert auth.check({"authorization": "Bearer s3cret"}) == hashlib.sha256(b"s3cret").hexdigest()[:8]
    with pytest.raises(Rejected, match="invalid API key"):
        auth.check({"x-api-key": "s3cre"})
    assert route_limits("/v1/chat/completions=30, /infer=6") == {"/v1/chat/completions": 30.0, "/infer": 6.0}
    monkeypatch.setenv("KILN_ROUTE_RATE_LIMITS", "/infer=fast")
    with pytest.raises(KilnError, match="KILN_ROUTE_RATE_LIMITS.*ROUTE=REQUESTS_PER_MINUTE"):
        load_settings()
    monkeypatch.delenv("KILN_ROUTE_RATE_LIMITS")
    monkeypatch.setenv("KILN_API_KEY_HASHES", "abc")
    with pytest.raises(KilnError, match="KILN_API_KEY_HASHES.*not a sha256 hex digest"):
        load_settings()


def test_input_is_cut_before_masking_without_leaving_part_of_an_address(monkeypatch):
    from pipeline.serve import inference

    seen = []
    real = inference.mask_pii
    monkeypatch.setattr(inference, "mask_pii", lambda text: seen.append(len(text)) or real(text))
    assert prepare_text("a " * 100_000 + "jane.roe@example.com", 100) == "a " * 50
    assert seen == [100 + inference.MASK_MARGIN]  # the masker read a bounded text, not 200 000 characters
    assert "jane" not in prepare_text("ab jane.roe@example.com", 6)


def test_every_text_of_a_chat_request_is_masked():
    from pipeline.serve.openai_api import BadRequest, prepare_messages

    settings = SimpleNamespace(kiln_max_messages=4, llm_input_max_length=2048)
    gw = SimpleNamespace(settings=settings, prepare=lambda t: prepare_text(t, 2048))
    messages = [
        {"role": "system", "content": "admin is root@example.com"},
        {"role": "user", "content": [{"type": "text", "text": "mail jane.roe@example.com"}, {"type": "image_url"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "send_to_bob@example.com",
                                                          "arguments": '{"to": "bob@example.com"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sent to bob@example.com"},
    ]  # fmt: skip
    masked = asyncio.run(prepare_messages(gw, messages))
    assert "@example.com" not in json.dumps(masked)
    assert "@example.com" in json.dumps(messages)
    assert masked[1]["content"][1] == {"type": "image_url"}
    for bad, where in (([{"role": "user", "content": ["plain"]}], "messages[0].content[0]"),
                       ([{"role": "user", "content": 3}], "messages[0].content"),
                       ([{"role": "user", "content": "x"}] * 5, "over the limit of 4")):  # fmt: skip
        with pytest.raises(BadRequest, match=where.replace("[", r"\[").replace("]", r"\]")):
            asyncio.run(prepare_messages(gw, bad))


def test_a_streamed_answer_reassembles_into_every_field():
    chunks = [
        {"id": "a", "model": "m", "created": 1, "object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": {"role": "assistant", "reasoning_content": "think"},
             "logprobs": {"content": [{"token": "x", "logprob": -1.0}]}}]},
        {"id": "a", "choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get", "arguments": '{"a"'}}]},
            "logprobs": {"content": [{"token": "y", "logprob": -2.0}]}}]},
        {"id": "a", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]},
                                 "finish_reason": "tool_calls"}],
         "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}, "timings": {"predicted_n": 2}},
    ]  # fmt: skip
    answer = assemble("/v1/chat/completions", chunks)
    choice = answer["choices"][0]
    assert choice["message"]["reasoning_content"] == "think"
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get", "arguments": '{"a": 1}'}}
    ]
    assert [t["token"] for t in choice["logprobs"]["content"]] == ["x", "y"]
    assert answer["object"] == "chat.completion"
    assert answer["timings"] == {"predicted_n": 2}
    two = merge_answers([answer, answer])
    assert [c["index"] for c in two["choices"]] == [0, 1]
    assert two["usage"]["completion_tokens"] == 4


# ---------------------------------------------------------------- real replicas


@pytest.mark.slow
def test_errors_raise_the_openai_clients_typed_exceptions(gateway):
    import openai

    gw = gateway(kiln_api_keys="k1", kiln_replicas=1, kiln_max_body_bytes=4096, max_concurrent_inference=1,
                 kiln_max_messages=3, kiln_rate_limit_burst=2, kiln_route_rate_limits="/v1/embeddings=1")  # fmt: skip
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k1", max_retries=0)
    chat = {"model": "x", "max_tokens": 2}
    with pytest.raises(openai.AuthenticationError) as denied:
        openai.OpenAI(base_url=f"{gw.url}/v1", api_key="wrong", max_retries=0).chat.completions.create(
            messages=[{"role": "user", "content": "hi"}], **chat
        )
    assert denied.value.body["type"] == "authentication_error"
    with pytest.raises(openai.UnprocessableEntityError, match=r"messages\[0\].content\[0\]"):
        client.chat.completions.create(messages=[{"role": "user", "content": ["plain string"]}], **chat)
    with pytest.raises(openai.UnprocessableEntityError, match="best_of: not supported"):
        client.completions.create(prompt="x", best_of=2, **chat)
    with pytest.raises(openai.UnprocessableEntityError, match="KILN_MAX_MESSAGES"):
        client.chat.completions.create(messages=[{"role": "user", "content": "hi"}] * 4, **chat)
    with pytest.raises(openai.APIStatusError) as too_large:
        client.chat.completions.create(messages=[{"role": "user", "content": "x" * 5000}], **chat)
    assert too_large.value.status_code == 413
    assert too_large.value.body["code"] == "request_too_large"
    for _ in range(2):  # the route's own limit: 2 at once, then 1 a minute
        with pytest.raises(openai.NotFoundError, match="embeddings are not served"):
            client.embeddings.create(model="x", input="hi")
    with pytest.raises(openai.RateLimitError, match="rate limit exceeded"):
        client.embeddings.create(model="x", input="hi")
    with pytest.raises(openai.UnprocessableEntityError, match="n: more than one choice cannot be streamed"):
        client.completions.create(prompt="x", n=2, stream=True, **chat)
    with pytest.raises(openai.UnprocessableEntityError, match="MAX_CONCURRENT_INFERENCE is 1"):
        client.completions.create(prompt="x", n=2, **chat)  # n answers are n admissions
    with pytest.raises(openai.BadRequestError, match="context"):  # llama-server's own refusal, passed through
        client.completions.create(prompt="x " * 1000, **chat)
    answer = client.completions.create(prompt="x", **chat)
    assert answer.choices[0].text is not None


@pytest.mark.slow
def test_chat_pii_is_masked_in_every_message_and_part_end_to_end(gateway):
    gw = gateway(kiln_replicas=1)
    replica = gw.replica()
    raw = [
        {"role": "system", "content": "the admin is root@example.com"},
        {"role": "user", "content": [{"type": "text", "text": "write to jane.roe@example.com"},
                                     {"type": "text", "text": "and call +1 415 555 0100"}]},
        {"role": "assistant", "content": "sure, ann@example.org"},
        {"role": "user", "content": "thanks, bob.smith@example.net"},
    ]  # fmt: skip
    masked = json.loads(json.dumps(raw))
    masked[0]["content"] = prepare_text(raw[0]["content"], 2048)
    for part in masked[1]["content"]:
        part["text"] = prepare_text(part["text"], 2048)
    for m in masked[2:]:
        m["content"] = prepare_text(m["content"], 2048)
    assert "@" not in json.dumps(masked)

    def prompt_tokens(url: str, messages, headers=None) -> int:
        body = {"messages": messages, "max_tokens": 1, "temperature": 0}
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]

    through_kiln = prompt_tokens(gw.url, raw)
    direct_masked = prompt_tokens(replica.url, masked, replica.headers)
    for i in range(len(raw)):  # each message alone unmasked reads differently: every one must be masked
        one_raw = json.loads(json.dumps(masked))
        one_raw[i] = raw[i]
        assert prompt_tokens(replica.url, one_raw, replica.headers) != direct_masked, i
    assert through_kiln == direct_masked


@pytest.mark.slow
def test_replicas_cannot_be_reached_around_the_gateway(gateway):
    gw = gateway(kiln_replicas=1)
    replica = gw.replica()
    direct = httpx.post(f"{replica.url}/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert direct.status_code == 401
    assert replica.api_key not in " ".join(str(v) for v in gw.client.get("/").json().values())
    assert gw.client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


@pytest.mark.slow
def test_spoofed_forwarded_for_buys_no_fresh_bucket_and_failed_auth_is_limited(gateway, caplog):
    # a limit on /infer alone (2 at once, then 1 a minute), keyed on the peer: a new X-Forwarded-For each time
    gw = gateway(kiln_replicas=1, kiln_rate_limit_burst=2, kiln_route_rate_limits="/infer=1")
    body = {"query": "x", "max_length": 1}
    codes = [gw.client.post("/infer", json=body, headers={"X-Forwarded-For": f"9.9.9.{i}"}).status_code
             for i in range(3)]  # fmt: skip
    assert codes == [200, 200, 429], codes
    assert gw.client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200  # not limited

    keyed = gateway(kiln_replicas=1, kiln_api_keys="right", kiln_auth_failures_per_min=3)

    def access_lines():
        return [json.loads(r.getMessage()) for r in caplog.records if r.name == "kiln.serve.access"]

    with caplog.at_level(logging.INFO, logger="kiln.serve.access"):
        caplog.clear()  # only this gateway's lines: the first one's 429 may be in the log already
        tries = [keyed.client.post("/infer", json=body, headers={"X-API-Key": f"guess{i}"}).status_code
                 for i in range(5)]  # fmt: skip
        locked = keyed.client.post("/infer", json=body, headers={"X-API-Key": "right"})
        # the edge writes a request's line once its response is sent: the client may read it first
        deadline = time.monotonic() + 60
        while len(access_lines()) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        lines = access_lines()
    assert tries == [401, 401, 401, 429, 429]
    assert locked.status_code == 429
    assert "failed authentications" in locked.json()["detail"]
    assert [line["status"] for line in lines] == [401, 401, 401, 429, 429, 429]  # one line each, 401s included
    assert all("guess" not in json.dumps(line) for line in lines)


TOOL = {
    "type": "function",
    "function": {
        "name": "weather", "description": "the weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}  # fmt: skip


@pytest.mark.slow
def test_a_non_streamed_answer_holds_every_field_llama_server_gives(gateway):
    gw = gateway(kiln_replicas=1)
    replica = gw.replica()
    for path, body in (
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 2},
        ),
        ("/v1/completions", {"prompt": "def f(", "logprobs": 2}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "weather in Seoul?"}], "tools": [TOOL]}),
        ("/v1/completions", {"prompt": "def g("}),
    ):
        body = {**body, "max_tokens": 4, "temperature": 0}
        direct = httpx.post(f"{replica.url}{path}", json=body, headers=replica.headers, timeout=60).json()
        kiln = gw.client.post(path, json=body).json()
        assert _shape(kiln) == _shape(direct), (path, direct)
        assert kiln["choices"][0] == direct["choices"][0], path  # the same greedy answer, field for field
        assert kiln["choices"][0].get("logprobs") or "logprobs" not in body, path
    two = gw.client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "n": 2}).json()
    assert [c["index"] for c in two["choices"]] == [0, 1]
    assert two["usage"]["completion_tokens"] >= 2


def _shape(value, prefix: str = "") -> set[str]:
    """Every key path in a JSON value (list items merged), the values left out."""
    if isinstance(value, dict):
        return {p for k, v in value.items() for p in {f"{prefix}.{k}"} | _shape(v, f"{prefix}.{k}")}
    if isinstance(value, list):
        return {p for item in value for p in _shape(item, f"{prefix}[]")}
    return set()
