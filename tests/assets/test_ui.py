"""The Dagster UI: the webserver loads the code location (GraphQL), and the asset graph renders
in a real browser (headless Chromium, Debian's package, installed here when missing)."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from browser import chromium

ROOT = Path(__file__).resolve().parents[2]
ASSETS = {
    "raw_corpus": "data", "clean_corpus": "data", "feedback_pairs": "data", "tokenizer": "training",
    "base_model": "training",
    "sft_data": "post_training", "dpo_data": "post_training", "sft_model": "post_training",
    "dpo_model": "post_training", "gguf_model": "release", "gguf_benchmark": "release", "sampling_preset": "release",
    "registered_model": "release",
    "eval_report": "evaluation",
}  # fmt: skip
CHECKS = {
    "clean_corpus_not_empty", "clean_corpus_pii_free", "tokenizer_round_trip", "base_model_beats_unigram",
    "base_model_parameter_budget", "gguf_parity", "eval_gate",
}  # fmt: skip
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def webserver(tmp_path_factory):
    home = tmp_path_factory.mktemp("dagster_home")
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    port = _free_port()
    env = dict(os.environ, DAGSTER_HOME=str(home), KILN_WORK_DIR=str(home / "work"))
    exe = Path(sys.executable).with_name("dagster-webserver")
    proc = subprocess.Popen(
        [str(exe), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/server_info", timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("the Dagster webserver did not answer within 120 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _graphql(url: str, query: str) -> dict:
    import json

    req = urllib.request.Request(
        f"{url}/graphql", data=json.dumps({"query": query}).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        body = json.loads(resp.read())
    assert "errors" not in body, body.get("errors")
    return body["data"]


def test_code_location_has_every_asset_check_job_schedule_and_sensor(webserver):
    data = _graphql(
        webserver,
        "{ assetNodes { assetKey { path } groupName description "
        "assetChecksOrError { ... on AssetChecks { checks { name } } } } "
        "repositoriesOrError { ... on RepositoryConnection { nodes { jobs { name } schedules { name cronSchedule } "
        "sensors { name } } } } }",
    )
    nodes = {n["assetKey"]["path"][-1]: n for n in data["assetNodes"]}
    assert {k: n["groupName"] for k, n in nodes.items()} == ASSETS
    assert all(n["description"] for n in nodes.values())
    checks = {c["name"] for n in nodes.values() for c in n["assetChecksOrError"].get("checks", [])}
    assert checks == CHECKS
    repo = data["repositoriesOrError"]["nodes"][0]
    jobs = {j["name"] for j in repo["jobs"]}
    assert {"kiln_pipeline", "data", "training", "post_training", "evaluation", "release", "feedback_retrain"} <= jobs
    assert [s["name"] for s in repo["schedules"]] == ["weekly_retrain"]
    assert sorted(s["name"] for s in repo["sensors"]) == ["new_feedback", "new_raw_data"]


def test_asset_graph_page_shows_the_assets(webserver, tmp_path):
    browser = chromium()
    seen = ""
    for group in sorted(set(ASSETS.values())):  # each group's asset graph
        page = f"{webserver}/locations/kiln/asset-groups/{group}"
        proc = subprocess.run(
            [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / group}", "--window-size=1600,1000",
             "--virtual-time-budget=30000", "--dump-dom", page],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-500:]
        seen += proc.stdout
        for name, g in ASSETS.items():
            if g == group:
                assert name in proc.stdout, f"{name} not on the {group} asset graph page"
    assert "Materialize" in seen
