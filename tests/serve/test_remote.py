"""Replicas on other hosts: two `kiln replica` processes on 127.0.0.2 and 127.0.0.3 (other "machines" on
loopback, each with its own cache), one gateway with no local replica over them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
from served import hammering

from pipeline.io import free_port
from tests.serve.conftest import Gateway, wait_for

KEY = "remote-replica-test-key"
HOSTS = ("127.0.0.2", "127.0.0.3")


class ReplicaProcess:
    """`kiln replica` in a process of its own session, stopped by its PID (it stops its llama-server)."""

    def __init__(self, host: str, uri: str, profile: Path, workdir: Path) -> None:
        self.port = free_port(host, pair=True)
        self.url, self.control = f"http://{host}:{self.port}", f"http://{host}:{self.port + 1}"
        self.log = workdir / f"replica-{host}.log"
        env = {
            **os.environ, "KILN_REPLICA_KEY": KEY, "KILN_SLOTS": "2", "KILN_THREADS": "1",
            "KILN_CACHE_DIR": str(workdir / f"cache-{host}"), "KILN_WARMUP_REQUESTS": "1",
        }  # fmt: skip
        cmd = [sys.executable, "-m", "pipeline.cli", "replica", "--profile", str(profile), "--tracking-uri", uri,
               "--host", host, "--port", str(self.port)]  # fmt: skip
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def status(self) -> dict | None:
        try:
            r = httpx.get(self.control + "/status", headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code == 200 else None

    def stop(self) -> None:
        status = self.status()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if status and status.get("pid"):  # its llama-server, should the process have died without stopping it
            with contextlib.suppress(ProcessLookupError):
                os.kill(status["pid"], signal.SIGKILL)


@pytest.mark.slow
def test_remote_replicas_take_a_promote_under_load_and_lose_one(env, store, restore_production, tmp_path):
    from pipeline.cli import main
    from pipeline.serve.server import registry_target

    uri, profile = store
    remotes = [ReplicaProcess(host, uri, profile, tmp_path) for host in HOSTS]
    gw = None
    try:
        for r in remotes:
            wait_for(lambda r=r: r.status() or r.proc.poll() is not None, f"kiln replica on {r.url}", timeout=180)
            assert r.proc.poll() is None, r.log.read_text()
            assert r.status()["version"] == "1"
        unauthorized = httpx.get(remotes[0].control + "/status")
        assert unauthorized.status_code == 401
        gw = Gateway(
            registry_target(uri, "test", "production", "Q4_K_M"), kiln_replicas=0,
            kiln_replica_urls=",".join(r.url for r in remotes), kiln_replica_key=KEY, kiln_poll_sec=0.5,
            kiln_drain_sec=10,
        )  # fmt: skip
        pool = gw.deployment.active
        assert [replica.remote for replica in pool.replicas] == [True, True]
        wait_for(lambda: len(gw.deployment.active.ready()) == 2, "both remote replicas in the pool")

        with hammering(gw.url, 4) as results:
            wait_for(lambda: sum(v == "1" for _, v in list(results)) >= 4, "answers from version 1")
            assert main(["promote", "2", "--profile", str(profile), "--tracking-uri", uri]) == 0
            wait_for(lambda: gw.client.get("/").json()["version"] == "2", "the swap to version 2", timeout=180)
            wait_for(lambda: all((r.status() or {}).get("version") == "2" for r in remotes),
                     "both hosts on version 2", timeout=180)  # fmt: skip
            wait_for(lambda: len(gw.deployment.active.ready()) == 2, "both remote replicas back on 2", timeout=180)
            seen = len(results)
            wait_for(lambda: len(results) > seen + 4, "answers after the swap")
        failures = [r for r in results if r[0] != 200]
        assert not failures, failures[:3]
        versions = [v for _, v in results]
        assert (versions[0], versions[-1]) == ("1", "2"), versions
        assert gw.client.get("/").json()["replicas"] == {"ready": 2, "total": 2}

        # one host's llama-server killed: its traffic moves to the other, its `kiln replica` exits 1
        victim, survivor = remotes[0], remotes[1]
        os.kill(victim.status()["pid"], signal.SIGKILL)
        with hammering(gw.url, 3) as results:
            wait_for(lambda: len(gw.deployment.active.ready()) == 1, "the dead replica out of the pool")
            seen = len(results)
            wait_for(lambda: len(results) > seen + 6, "answers after the loss")
        assert victim.proc.wait(30) == 1, victim.log.read_text()
        failed = [r for r in results if r[0] != 200]
        assert len(failed) <= 2, failed  # at most what was generating there (2 slots)
        assert all(r[0] != 200 or r[1] == "2" for r in results)
        ready = gw.deployment.active.ready()
        assert [r.url for r in ready] == [survivor.url]
        assert ready[0].in_flight == 0

        # stopped as systemd or Kubernetes stop it, `kiln replica` stops its llama-server and exits 0
        server_pid = survivor.status()["pid"]
        survivor.proc.send_signal(signal.SIGTERM)
        assert survivor.proc.wait(60) == 0, survivor.log.read_text()
        wait_for(lambda: not psutil.pid_exists(server_pid), "the survivor's llama-server stopped")
    finally:
        if gw is not None:
            gw.close()
        for r in remotes:
            r.stop()


def test_settings_refuse_nothing_to_serve_and_a_bad_url():
    from pipeline.errors import KilnError
    from pipeline.serve.settings import load_settings

    with pytest.raises(KilnError, match="nothing would serve"):
        load_settings(kiln_replicas=0)
    with pytest.raises(KilnError, match="http://HOST:PORT"):
        load_settings(kiln_replica_urls="127.0.0.2:8080", kiln_replica_key="k")
    with pytest.raises(KilnError, match="KILN_REPLICA_KEY"):
        load_settings(kiln_replica_urls="http://127.0.0.2:8080")
    assert load_settings(
        kiln_replicas=0, kiln_replica_urls="http://127.0.0.2:8080/", kiln_replica_key="k"
    ).replica_urls == ["http://127.0.0.2:8080"]
