"""The alert rules under `promtool test rules` (deploy/prometheus/rules_test.yml), and the Prometheus of
`make services` (pipeline/deploy/services.py) scraping a real `kiln serve` that announces itself."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from needs import unavailable

from pipeline.deploy import services
from pipeline.io import free_port
from pipeline.layout import PROMETHEUS_DIR, PROMETHEUS_TARGETS_ENV, REPO_ROOT


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        unavailable("promtool", "apt-get install prometheus (make test installs it as root)")
    return found


def test_the_alert_rules_pass_their_unit_tests(promtool):
    checked = subprocess.run([promtool, "check", "rules", "rules.yml"], cwd=PROMETHEUS_DIR, capture_output=True,
                             text=True)  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 21 rules found" in checked.stdout, checked.stdout + checked.stderr
    tested = subprocess.run([promtool, "test", "rules", "rules_test.yml"], cwd=PROMETHEUS_DIR, capture_output=True,
                            text=True)  # fmt: skip
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_a_loosened_threshold_fails_the_rule_tests(promtool, tmp_path):
    # the rule tests catch a rule that no longer fires: the error-rate alert at 50% instead of 5%
    rules = (PROMETHEUS_DIR / "rules.yml").read_text()
    loosened = rules.replace("sum(rate(kiln_requests_total[5m])) > 0.05", "sum(rate(kiln_requests_total[5m])) > 0.5")
    assert loosened != rules
    (tmp_path / "rules.yml").write_text(loosened)
    shutil.copyfile(PROMETHEUS_DIR / "rules_test.yml", tmp_path / "rules_test.yml")
    tested = subprocess.run([promtool, "test", "rules", "rules_test.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert tested.returncode == 1
    assert "alertname: KilnHighErrorRate" in tested.stdout + tested.stderr


def test_the_grafana_dashboard_queries_the_gateways_series():
    dashboard = json.loads((PROMETHEUS_DIR / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    rules = (PROMETHEUS_DIR / "rules.yml").read_text()
    recorded = [e.split("{")[0].split(" ")[0] for e in exprs if e.startswith("version:")]
    assert recorded
    assert all(f"record: {r}" in rules for r in recorded)


def _query(port: int, promql: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())["data"]["result"]


def _until(what: str, check, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout:.0f} s")


@pytest.mark.slow
def test_prometheus_scrapes_a_running_kiln_serve(promtool, ggufs, tmp_path):
    from pipeline.deploy.prometheus import ensure_prometheus
    from pipeline.errors import KilnError
    from pipeline.serve import engine

    try:
        ensure_prometheus()
        binary = engine.locate()
    except (KilnError, engine.EngineUnavailable) as exc:
        unavailable("Prometheus or llama-server", exc)
    s = services.Services(tmp_path / "services")
    state = {"prometheus_port": free_port()}
    s.root.mkdir()
    services.start_prometheus(s, state)
    port, serve = free_port(), None
    try:
        env = {**os.environ, PROMETHEUS_TARGETS_ENV: str(s.prometheus / "targets"), "KILN_LLAMA_SERVER": str(binary),
               "KILN_CACHE_DIR": str(tmp_path / "cache"), "KILN_REPLICAS": "1", "KILN_THREADS": "1"}  # fmt: skip
        serve = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "serve", "--gguf", str(ggufs["Q4_K_M"]), "--port", str(port)],
            cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        target = s.prometheus / "targets" / f"kiln-serve-{port}.json"
        _until("kiln serve announced itself", target.exists)

        def answered():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                return False

        _until("kiln serve became healthy", answered)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/infer", data=json.dumps({"query": "x", "max_length": 2}).encode(),
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=60) as resp:
            version = json.loads(resp.read())["version"]
        up = _until("Prometheus scraped the gateway", lambda: _query(state["prometheus_port"], 'up{job="kiln"} == 1'))
        assert up[0]["metric"]["instance"] == f"127.0.0.1:{port}"
        answers = _until(
            "the gateway's answers reached Prometheus", lambda: _query(state["prometheus_port"], "kiln_answers_total")
        )
        assert answers[0]["metric"]["version"] == version
        assert float(answers[0]["value"][1]) == 1
        with urllib.request.urlopen(f"http://127.0.0.1:{state['prometheus_port']}/api/v1/rules", timeout=10) as resp:
            groups = json.loads(resp.read())["data"]["groups"]
        alerts = {r["name"] for g in groups for r in g["rules"] if r["type"] == "alerting"}
        assert {"KilnCanaryRegression", "KilnReplicaDown", "KilnGpuMemoryHigh"} <= alerts
        serve.send_signal(signal.SIGINT)  # Ctrl-C: the gateway stops and withdraws its target
        serve.wait(timeout=60)
        assert not target.exists()
    finally:
        if serve is not None and serve.poll() is None:
            serve.send_signal(signal.SIGINT)  # its replicas stop with it
            try:
                serve.wait(timeout=30)
            except subprocess.TimeoutExpired:
                serve.kill()
                serve.wait()
        services.down(s.root)  # Prometheus, by the pid in state.json
