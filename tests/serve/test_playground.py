"""Any registered version served on demand, and the playground page in a real browser.

The gateway serves a sqlite registry's production alias (version 1) with real llama-server
replicas; versions 2 and 3 are registered copies of the test GGUF, version 4 one llama-server cannot
load. The browser is Debian's chromium, driven by Playwright through its executable path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from browser import chromium

from pipeline.data.feedback import tracing_client
from pipeline.serve.tracing import TRACE_HEADER
from tests.serve.conftest import Gateway, register_ggufs, unloadable_gguf, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("writer_at_normal_priority")]
EMAIL = "jane.roe@example.com"


@pytest.fixture(scope="module")
def versions(env, ggufs, tmp_path_factory) -> str:  # env: tests/serve/conftest.py
    good = Path(ggufs["Q4_K_M"]).read_bytes()
    return register_ggufs(tmp_path_factory.mktemp("versions"), [good, good, good, unloadable_gguf(ggufs["Q4_K_M"])])


@pytest.fixture
def served(versions):
    from pipeline.serve.server import registry_target

    gw = Gateway(registry_target(versions, "test", "production", "Q4_K_M"), kiln_replicas=1)
    yield gw
    gw.close()


def _trace_meta(gw: Gateway, uri: str, trace_id: str) -> dict:
    assert gw.gw.tracing.wait_written(trace_id, 600)
    return tracing_client(uri).get_trace_info(trace_id).trace_metadata


def test_a_request_naming_any_registered_version_is_served_on_demand(served, versions):
    def ask(model: str):
        body = {"model": model, "prompt": "x", "max_tokens": 2}
        return served.client.post("/v1/completions", json=body, timeout=300)  # may start a version first

    two = ask("kiln-test:2")
    assert two.status_code == 200
    assert _trace_meta(served, versions, two.headers[TRACE_HEADER])["kiln.version"] == "2"
    listed = {(s["version"], s["role"]) for s in served.client.get("/llm/models").json()["served"]}
    assert listed == {("1", "production"), ("2", "on-demand")}
    first = served.deployment.on_demand["2"]

    three = ask("3")  # a bare version number names it too; one version on demand by default
    assert three.status_code == 200
    meta = _trace_meta(served, versions, three.headers[TRACE_HEADER])
    assert (meta["kiln.version"], meta["kiln.role"], meta["kiln.alias"]) == ("3", "on-demand", "")
    assert list(served.deployment.on_demand) == ["3"]
    wait_for(lambda: not any(r.alive() for r in first.replicas), "version 2, named least recently, is stopped")

    broken, unknown = ask("kiln-test:4"), ask("kiln-test:9")
    assert broken.status_code == unknown.status_code == 404
    assert "version 4 could not start" in broken.json()["error"]["message"]
    assert "version 9 cannot be served" in unknown.json()["error"]["message"]
    other = ask("gpt-4o")  # a name that is no version: the rotation answers, as for any OpenAI client
    assert other.status_code == 200
    assert _trace_meta(served, versions, other.headers[TRACE_HEADER])["kiln.version"] == "1"
    assert served.client.get("/").json()["version"] == "1"  # production untouched throughout


def test_on_demand_versions_can_be_turned_off(versions):
    from pipeline.serve.server import registry_target

    gw = Gateway(registry_target(versions, "test", "production", "Q4_K_M"), kiln_replicas=1, kiln_on_demand_versions=0)
    try:
        refused = gw.client.post("/v1/completions", json={"model": "kiln-test:2", "prompt": "x", "max_tokens": 2})
        assert refused.status_code == 404
        assert refused.json()["error"]["message"] == "version 2 is not served here (only production 1)"
        assert gw.deployment.on_demand == {}
    finally:
        gw.close()


def test_the_playground_chats_streams_rates_and_compares_any_version(served, versions):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("dialog", lambda dialog: dialog.accept(f"def add(a, b): return a + b  # {EMAIL}"))
            page.goto(served.url + "/playground")
            page.wait_for_function(
                "document.querySelectorAll('[data-testid=version] option').length == 4", timeout=120_000
            )
            options = page.locator("[data-testid=version] option").all_text_contents()
            assert options[:2] == ["production (version 1)", "version 2 (starts on first use)"]
            page.get_by_test_id("preset").select_option("greedy")
            page.get_by_test_id("prompt").fill(f"def add(a, b): mail {EMAIL}")
            page.get_by_test_id("send").click()
            answer = page.locator("[data-testid=answer][data-done]")
            answer.wait_for(timeout=120_000)
            text = answer.locator("pre").text_content()
            rated = answer.get_attribute("data-trace-id")
            answer.get_by_test_id("rate-down").click()  # asks for the right answer (the dialog above)
            page.locator(".note[data-state=stored]").wait_for(timeout=120_000)
            # a new chat, side by side: production against version 2, which the gateway starts for it;
            # the second answer picked
            page.get_by_test_id("new-chat").click()
            page.get_by_test_id("compare").check()
            page.get_by_test_id("version-b").select_option("kiln-test:2")
            page.get_by_test_id("prompt").fill("def mul(a, b):")
            page.get_by_test_id("send").click()
            done = "document.querySelectorAll('[data-testid=answer][data-done]').length == 2"
            page.wait_for_function(done, timeout=300_000)  # version 2 starts first
            assert page.locator("pre.error").count() == 0, page.locator("pre.error").all_text_contents()
            pair = page.locator(".turn").nth(0).locator("[data-testid=answer]")
            left, right = pair.nth(0).get_attribute("data-trace-id"), pair.nth(1).get_attribute("data-trace-id")
            pair.nth(1).get_by_test_id("pick").click()
            page.locator(".turn").nth(0).locator(".note[data-state=stored]").wait_for(timeout=120_000)
        finally:
            browser.close()
    client = tracing_client(versions)
    trace = client.get_trace(rated)
    assert trace.data.spans[0].outputs["text"] == text  # the page showed the traced answer
    assert trace.data.spans[0].inputs["messages"][-1]["content"] == "def add(a, b): mail <EMAIL>"
    judged = {(a.name, str(a.value)) for a in trace.info.assessments}
    assert judged == {("rating", "down"), ("preferred_answer", "def add(a, b): return a + b  # <EMAIL>")}
    assert [(a.name, a.value) for a in client.get_trace_info(right).assessments] == [("pairwise", "chosen")]
    assert [(a.name, a.value) for a in client.get_trace_info(left).assessments] == [("pairwise", "rejected")]
    assert client.get_trace_info(left).trace_metadata["kiln.version"] == "1"
    assert client.get_trace_info(right).trace_metadata["kiln.version"] == "2"
