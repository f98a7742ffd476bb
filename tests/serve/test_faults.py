"""The faults production traffic brings, against real llama-server processes: clients that leave at
every moment, a hung replica (SIGSTOP), a replica that crashes on start, a canary that cannot start,
a hot swap that fails, a long stream across a swap and a drain time that runs out."""

from __future__ import annotations

import json
import os
import signal
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.serve.conftest import (
    Gateway,
    close_abruptly,
    raw_request,
    read_until,
    slots_busy,
    unloadable_gguf,
    upstream_requests,
    wait_for,
)

ENDLESS = {"prompt": "x", "max_tokens": 100000, "ignore_eos": True}  # with context shift: only a stop ends it


def _idle(gw) -> bool:
    adm, replica = gw.gw.admission, gw.replica()
    up = upstream_requests(replica)
    return (adm.in_flight, adm.queued) == (0, 0) and slots_busy(replica) == 0 and up.get("deferred", 0) == 0


def _all_admitted_at_once(gw, n: int) -> None:
    """n endless streams at once: every one admitted (none queued), then all closed and given back."""
    socks = [raw_request(gw.url, "/v1/completions", {**ENDLESS, "stream": True}) for _ in range(n)]
    try:
        wait_for(lambda: gw.gw.admission.in_flight == n and gw.gw.admission.queued == 0, f"{n} admitted at once")
    finally:
        for sock in socks:
            close_abruptly(sock)
    wait_for(lambda: _idle(gw), "the places and the slots given back")


@pytest.mark.slow
def test_a_client_leaving_at_any_moment_gives_back_its_place_and_stops_its_generation(gateway):
    n = 8
    gw = gateway(kiln_replicas=1, max_concurrent_inference=n, kiln_max_queue=16, kiln_context_shift=True,
                 kiln_first_token_timeout_sec=600)  # deferred by llama-server is not hung here  # fmt: skip
    replica = gw.replica()

    # 1. non-streamed requests, while the model computes the whole answer
    socks = [raw_request(gw.url, "/v1/completions", ENDLESS) for _ in range(n)]
    wait_for(lambda: gw.gw.admission.in_flight == n and slots_busy(replica) > 0, "8 answers being computed")
    for sock in socks:
        close_abruptly(sock)
    wait_for(lambda: _idle(gw), "non-streamed requests left: places and generations given back")

    # 2. streams still queued for admission, behind 8 that hold every place
    holders = [raw_request(gw.url, "/v1/completions", {**ENDLESS, "stream": True}) for _ in range(n)]
    wait_for(lambda: gw.gw.admission.in_flight == n, "8 streams hold every place")
    queued = [raw_request(gw.url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                            "stream": True}) for _ in range(n)]  # fmt: skip
    wait_for(lambda: gw.gw.admission.queued == n, "8 streams queued")
    for sock in queued:
        close_abruptly(sock)
    wait_for(lambda: gw.gw.admission.queued == 0, "the queue forgot the streams that left")
    assert gw.gw.admission.in_flight == n
    for sock in holders:
        close_abruptly(sock)
    wait_for(lambda: _idle(gw), "the holders left")

    # 3. streams waiting for their first token (the replica is stopped)
    os.kill(replica.pid, signal.SIGSTOP)
    try:
        waiting = [raw_request(gw.url, "/infer/stream", {"query": "x", "max_length": 50}) for _ in range(n)]
        wait_for(lambda: gw.gw.admission.in_flight == n, "8 streams admitted, waiting for a first token")
        for sock in waiting:
            close_abruptly(sock)
        wait_for(lambda: gw.gw.admission.in_flight == 0, "streams waiting for a first token gave their places back")
    finally:
        os.kill(replica.pid, signal.SIGCONT)
    wait_for(lambda: _idle(gw), "nothing generating for the streams that left")

    _all_admitted_at_once(gw, n)
    metrics = gw.client.get("/metrics").text
    assert 'kiln_request_outcomes_total{outcome="client_disconnected",route="/v1/completions",status="499"}' in metrics


@pytest.mark.slow
def test_fifty_clients_leaving_mid_stream_leave_every_place_free(gateway):
    n = 4
    gw = gateway(kiln_replicas=1, max_concurrent_inference=n, kiln_max_queue=0, kiln_context_shift=True,
                 kiln_first_token_timeout_sec=600)  # fmt: skip
    for i in range(50):
        path, body = [("/v1/completions", {**ENDLESS, "stream": True}),
                      ("/infer/stream", {"query": "x", "max_length": 4000})][i % 2]  # fmt: skip
        sock = raw_request(gw.url, path, body)
        read_until(sock, b"data: {")
        close_abruptly(sock)
    wait_for(lambda: _idle(gw), "50 streams left mid-way: nothing in flight, nothing generating")
    _all_admitted_at_once(gw, n)


@pytest.mark.slow
def test_a_hung_replica_is_skipped_retried_and_taken_back(gateway):
    gw = gateway(kiln_replicas=2, kiln_first_token_timeout_sec=1.0)
    hung, healthy = gw.replica(0), gw.replica(1)
    os.kill(hung.pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(4) as pool:  # least-busy routing sends some of these to the stopped replica
            answers = list(pool.map(lambda _: gw.client.post("/infer", json={"query": "x", "max_length": 3}), range(4)))
        assert [r.status_code for r in answers] == [200] * 4, [r.text for r in answers]
        wait_for(lambda: hung.state == "unresponsive", "the hung replica is out of the pool")
        assert gw.client.get("/").json()["replicas"]["ready"] == 1
        health = gw.client.get("/health").json()
        assert health["status"] == "degraded"
        assert health["replicas"][hung.name]["state"] == "unresponsive"
        assert all(r.json()["version"] == "local" for r in answers)
        metrics = gw.client.get("/metrics").text
        assert f'kiln_replica_hung_total{{replica="{hung.name}"}}' in metrics
        assert healthy.state == "ready"
    finally:
        os.kill(hung.pid, signal.SIGCONT)
    wait_for(lambda: hung.state == "ready", "the replica answers /health again and is back")
    assert gw.client.get("/health").json()["status"] == "ok"


@pytest.mark.slow
def test_a_replica_that_crashes_on_start_backs_off_and_comes_back(env, ggufs, llama_server, tmp_path):
    from pipeline.serve.server import file_target

    flag = tmp_path / "crash"
    wrapper = tmp_path / "llama-server"
    wrapper.write_text(
        f'#!/bin/sh\nif [ -e "{flag}" ]; then echo "crashing on purpose" >&2; exit 1; fi\nexec "{llama_server}" "$@"\n'
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    saved = os.environ["KILN_LLAMA_SERVER"]
    os.environ["KILN_LLAMA_SERVER"] = str(wrapper)
    try:
        gw = Gateway(file_target(Path(ggufs["Q4_K_M"])), kiln_replicas=2, kiln_restart_backoff_max_sec=4)
    finally:
        os.environ["KILN_LLAMA_SERVER"] = saved
    try:
        victim = gw.replica(0)
        flag.touch()
        os.kill(victim.pid, signal.SIGKILL)
        wait_for(lambda: victim.failures >= 4, "four failed starts in a row")
        assert victim.backoffs[:4] == [1.0, 2.0, 4.0, 4.0]  # doubling, capped: it never spins
        health = gw.client.get("/health")
        assert health.status_code == 200
        assert health.json()["status"] == "degraded"
        trouble = health.json()["replicas"][victim.name]
        assert trouble["state"] == "failed"
        assert "exited at start" in trouble["error"]
        assert gw.client.post("/infer", json={"query": "x", "max_length": 2}).status_code == 200  # one serves on
        metrics = gw.client.get("/metrics").text
        assert f'kiln_replica_state{{replica="{victim.name}",state="failed",version="local"}} 1.0' in metrics
        assert f'kiln_replica_restart_backoff_seconds{{replica="{victim.name}"}} 4.0' in metrics
        flag.unlink()
        wait_for(lambda: victim.state == "ready", "the replica starts once it can", timeout=120)
        assert victim.failures == 0
        assert gw.client.get("/health").json()["status"] == "ok"
    finally:
        flag.unlink(missing_ok=True)
        gw.close()


@pytest.mark.slow
def test_a_canary_that_cannot_start_leaves_production_serving(env, ggufs, tmp_path):
    from pipeline.serve.server import file_target

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(unloadable_gguf(ggufs["Q4_K_M"]))  # its metadata reads; llama-server cannot load it
    gw = Gateway(file_target(Path(ggufs["Q4_K_M"])), canary=file_target(broken), canary_share=0.5, kiln_replicas=1)
    try:
        wait_for(lambda: gw.deployment.canary_error, "the canary's failure is known")
        assert not gw.startup_failed
        assert gw.thread.is_alive()
        info = gw.client.get("/").json()
        assert info["version"] == "local"
        assert "exited at start" in info["canary"]["error"]
        assert "kiln_canary_start_failed 1.0" in gw.client.get("/metrics").text
        for _ in range(4):
            assert gw.client.post("/infer", json={"query": "x", "max_length": 2}).status_code == 200
    finally:
        gw.close()


@pytest.mark.slow
def test_canary_routing_is_sticky_per_user(env, store):
    from pipeline.serve.server import registry_target

    uri, _ = store
    gw = Gateway(
        registry_target(uri, "test", "1", "Q4_K_M"),
        canary=registry_target(uri, "test", "2", "Q4_K_M"),
        canary_share=0.5,
        kiln_replicas=1,
    )
    try:
        wait_for(lambda: (gw.client.get("/").json()["canary"] or {}).get("ready"), "the canary is ready")
        sides = {}
        for user in [f"user-{i}" for i in range(12)]:
            seen = set()
            for _ in range(3):
                r = gw.client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "user": user})
                seen.add(r.json()["model"])
            assert len(seen) == 1, (user, seen)  # a conversation never flips between versions
            sides[user] = seen.pop()
        assert set(sides.values()) == {"kiln-test:1", "kiln-test:2"}  # and both sides have users
    finally:
        gw.close()


@pytest.mark.slow
def test_a_failed_hot_swap_leaves_the_old_version_serving(env, store, restore_production):
    from pipeline.release import registry
    from pipeline.serve.server import registry_target

    uri, _ = store
    serving = restore_production
    gw = Gateway(
        registry_target(uri, "test", "production", "Q4_K_M"), kiln_replicas=1, kiln_poll_sec=0.2, kiln_admin_keys="adm"
    )
    logs = Path(os.environ["KILN_CACHE_DIR"]) / "serve" / "logs"
    try:
        registry.promote(uri, "test", "3")  # pulled and verified, but llama-server cannot load it
        wait_for(lambda: gw.deployment.failed_version, "the poll tried version 3")
        started = len(list(logs.glob("llama-server-*.log")))
        polls = gw.deployment.polls
        wait_for(lambda: gw.deployment.polls >= polls + 5, "five more polls")
        assert len(list(logs.glob("llama-server-*.log"))) == started  # no new llama-server per poll
        assert 'kiln_version_swap_failures_total{version="3"} 1.0' in gw.client.get("/metrics").text
        info = gw.client.get("/").json()
        assert info["version"] == serving
        assert "version 3 could not be served" in info["error"]
        served = gw.client.post("/infer", json={"query": "x", "max_length": 2})
        assert served.status_code == 200, served.text
        assert served.json()["version"] == serving, served.text
        reload = gw.client.post("/admin/reload", headers={"X-API-Key": "adm"})
        assert reload.status_code == 503
        assert "version 3 could not be served" in reload.json()["detail"]
        assert "exited at start" in reload.json()["detail"]
        assert gw.client.get("/").json()["version"] == serving
        registry.promote(uri, "test", serving)
        wait_for(lambda: gw.deployment.failed_version is None, "the alias back on the served version")
        assert gw.client.get("/").json()["error"] is None
    finally:
        gw.close()


@pytest.mark.slow
def test_a_stream_spanning_a_swap_ends_on_its_version_and_a_drain_that_runs_out_ends_cleanly(
    env, store, restore_production, monkeypatch
):
    from pipeline.release import registry
    from pipeline.serve import replicas
    from pipeline.serve.server import registry_target

    uri, _ = store
    first = restore_production
    second = "2" if first == "1" else "1"
    monkeypatch.setattr(replicas, "STOP_GRACE_S", 30.0)  # a stopped replica ignores SIGTERM this long
    gw = Gateway(
        registry_target(uri, "test", "production", "Q4_K_M"),
        kiln_replicas=1,
        kiln_drain_sec=60,
        kiln_context_shift=True,
        kiln_admin_keys="adm",
    )
    admin = {"X-API-Key": "adm"}
    try:
        # a stream that starts on the old version, frozen mid-way while the swap happens, then completes
        old = gw.replica()
        body = {"prompt": "x", "max_tokens": 40, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{gw.url}/v1/completions", json=body, timeout=120) as s:
            assert s.status_code == 200, s.read()
            lines = s.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
            os.kill(old.pid, signal.SIGSTOP)  # frozen mid-stream: it cannot finish before the swap
            try:
                registry.promote(uri, "test", second)
                swapped = gw.client.post("/admin/reload", headers=admin)
                assert swapped.status_code == 200, swapped.text
                assert swapped.json()["to"] == second, swapped.text
                assert gw.deployment._draining  # the old version waits for its stream
            finally:
                os.kill(old.pid, signal.SIGCONT)
            rest = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert rest
        assert all(e["model"] == f"kiln-test:{first}" for e in rest)
        assert "error" not in rest[-1]
        assert rest[-1]["choices"][0]["finish_reason"] == "length"
        wait_for(lambda: not gw.deployment._draining and not old.alive(), "the old version stopped after its stream")

        # the drain time runs out: the stream ends with an error event, the event loop keeps serving
        gw.deployment.settings.kiln_drain_sec = 1.0
        old = gw.replica()
        endless = {**body, "max_tokens": 100000}  # with context shift: it cannot end before its version does
        with httpx.stream("POST", f"{gw.url}/v1/completions", json=endless, timeout=120) as s:
            lines = s.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
            os.kill(old.pid, signal.SIGSTOP)  # never finishes; ignores SIGTERM until SIGKILL
            registry.promote(uri, "test", first)
            assert gw.client.post("/admin/reload", headers=admin).status_code == 200
            wait_for(lambda: old.state == "stopped", "the drain time ran out and the old replica is being stopped")
            # while that process still ignores its SIGTERM, the gateway answers: stopping does not block
            assert old.alive()
            assert gw.client.get("/").status_code == 200
            assert old.alive()
            os.kill(old.pid, signal.SIGCONT)
            rest = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert "KILN_DRAIN_SEC" in rest[-1]["error"]["message"]
        assert rest[-1]["error"]["code"] == 503
        wait_for(lambda: not gw.deployment._draining, "the old version is gone")
    finally:
        gw.close()


@pytest.mark.slow
def test_a_client_that_does_not_read_cannot_hold_its_place_past_the_timeout(gateway):
    # the relay as the HTTP layer drives it, with a consumer that takes the first events and then
    # stops reading (as a send blocked on a full socket does): at the deadline the place is given back
    import asyncio

    from pipeline.serve.inference import Call

    gw = gateway(kiln_replicas=1, kiln_context_shift=True, inference_timeout_sec=2.0)
    inference, admission = gw.gw.inference, gw.gw.admission
    ended = []

    async def scenario():
        call = Call("/v1/completions")
        await admission.acquire()
        replica, resp, first = await inference.open_stream(call, "/v1/completions", {**ENDLESS, "stream": True})

        async def consumer():
            stream = inference.relay(call, replica, resp, first, on_end=lambda: ended.append(admission.release()))
            await stream.__anext__()
            await asyncio.Event().wait()  # never reads again: the relay sits in its yield

        task = asyncio.create_task(consumer())
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=60)
        return call

    call = asyncio.run_coroutine_threadsafe(scenario(), gw.deployment.loop).result(timeout=120)
    assert ended
    assert admission.in_flight == 0
    assert call.status == 503
    assert "did not read" in call.error
    wait_for(lambda: slots_busy(gw.replica()) == 0, "the generation stopped")
