"""The production deployment against real services: PostgreSQL, an MLflow tracking server on it and
Dagster's PostgreSQL storage, started once for the session by `pipeline.deploy.services` (what `make
services` runs) in a temporary folder on free loopback ports, and stopped afterwards."""

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from needs import unavailable

from pipeline.deploy import services
from pipeline.errors import KilnError
from pipeline.layout import REPO_ROOT
from pipeline.release import registry
from pipeline.tracking import LOCK_DATABASE_ENV, client, experiment_id

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def deployment():
    """(services folder, the printed environment). Skips only when PostgreSQL cannot be installed (fails
    instead under make test and CI)."""
    try:
        services.ensure_postgres()
    except KilnError as exc:
        unavailable("PostgreSQL", exc)
    root = Path(tempfile.mkdtemp(prefix="kiln-services-"))
    root.chmod(0o755)  # the database's unprivileged user walks down to its cluster
    try:
        env = services.up(root, ui=False, daemon=False)
        yield root, env
    finally:
        services.down(root)
        shutil.rmtree(root, ignore_errors=True)


def kiln(*args: str, env: dict) -> subprocess.Popen:
    """The command in a child process whose output goes to files, not pipes: a pipe nobody reads until the
    end blocks a chatty child once its buffer fills. `proc.stderr.read()` reads what it wrote so far."""
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # noqa: SIM115 (the child's, read later)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args], cwd=REPO_ROOT, env={**os.environ, **env}, stdout=out, stderr=err,
    )  # fmt: skip
    proc.stdout, proc.stderr = _Rewound(out), _Rewound(err)
    return proc


class _Rewound:
    """A file a child writes, read from its start."""

    def __init__(self, file) -> None:
        self.file = file

    def read(self) -> str:
        self.file.seek(0)
        return self.file.read()


def test_services_report_their_state(deployment):
    root, env = deployment
    rows = {name: running for name, running, _ in services.status(root)}
    assert rows["postgresql"]
    assert rows["mlflow"]
    assert not rows["dagster-webserver"]  # started without the UI
    assert env["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:")
    assert (root / "state.json").stat().st_mode & 0o077 == 0  # the password is the owner's only
    dagster_yaml = yaml.safe_load((root / "dagster_home" / "dagster.yaml").read_text())
    assert dagster_yaml["storage"]["postgres"]["postgres_url"] == {"env": "KILN_DAGSTER_DATABASE_URL"}
    assert dagster_yaml["run_coordinator"]["class"] == "QueuedRunCoordinator"


def register_versions(uri: str, bundle: Path, n: int) -> list[str]:
    bundle.mkdir()
    c = client(uri)
    run = c.create_run(experiment_id(c, "tiny", uri))
    versions = []
    for i in range(n):
        (bundle / "model.gguf").write_bytes(random.Random(i).randbytes(2000))
        versions.append(registry.register(uri, "tiny", run.info.run_id, bundle, {}, gate_passed=True))
    return versions


def test_concurrent_promotions_and_rollbacks_are_serialized(deployment, tmp_path, monkeypatch):
    root, env = deployment
    uri = env["MLFLOW_TRACKING_URI"]
    monkeypatch.setenv(LOCK_DATABASE_ENV, env[LOCK_DATABASE_ENV])
    versions = register_versions(uri, tmp_path / "bundle", 3)
    for v in versions + versions[:2]:  # five promotions deep: four rollbacks always have one to go back to
        registry.promote(uri, "tiny", v)
    before = len(registry.history(uri, "tiny"))

    commands = [["promote", versions[i % 3]] if i % 2 else ["rollback"] for i in range(8)]
    procs = [kiln(*cmd, "--profile", "tiny", "--tracking-uri", uri, env=env) for cmd in commands]
    outcomes = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _ in outcomes), outcomes

    events = registry.history(uri, "tiny")
    assert len(events) == before + 8
    assert sorted(e["action"] for e in events[before:]) == ["promote"] * 4 + ["rollback"] * 4
    # in order: each event starts from where the one before left production, and replaying the
    # promotions and rollbacks gives every rollback's target
    stack: list[str] = []
    for prev, e in zip([None, *events], events, strict=False):
        assert e["from"] == (prev["to"] if prev else None)
        if e["action"] == "promote":
            stack.append(e["to"])
        else:
            stack.pop()
            assert e["to"] == stack[-1]
    assert [e["when"] for e in events] == sorted(e["when"] for e in events)
    production, _ = registry.resolve(uri, "tiny", registry.PRODUCTION)
    assert production == events[-1]["to"]
    registry.verify(uri, "tiny", production, tmp_path / "check")  # an existing, verified version


def test_releases_on_a_server_need_the_lock_database(deployment, monkeypatch, capsys):
    from pipeline.cli import main

    _, env = deployment
    monkeypatch.delenv(LOCK_DATABASE_ENV, raising=False)
    assert main(["rollback", "--profile", "tiny", "--tracking-uri", env["MLFLOW_TRACKING_URI"]]) == 2
    err = capsys.readouterr().err.strip()
    assert LOCK_DATABASE_ENV in err
    assert "\n" not in err


def write_data_profile(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(3)
    words = ["river", "table", "window", "engine", "signal", "garden", "market", "letter", "model", "token"]
    for i in range(20):
        (src / f"n{i}.txt").write_text(" ".join(rng.choice(words) + str(rng.randrange(99)) for _ in range(80)) + ".")
    profile = {"base": "tiny", "name": "svc", "corpus": {"sources": [{"path": str(src)}], "max_bytes": None,
               "code_share": None}, "clean": {"validation_share": 0.2, "short_doc_keep": 1.0}}  # fmt: skip
    path = tmp_path / "svc.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


def wait_for(what: str, check, proc: subprocess.Popen, timeout: float = 150):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.3)
    pytest.fail(f"no {what} within {timeout} s")


def test_pipeline_run_survives_a_tracking_server_restart(deployment, tmp_path, monkeypatch):
    """The data job on a test profile under KILN_DEPLOYMENT=production: its Dagster run and events in
    PostgreSQL, its MLflow run on the server. The server is down when the run starts; it is started again
    once a stage has failed to reach it and is waiting for Dagster's retry. Both moves follow events in
    the run's own log, not times: the retries (one a second, 120 of them) outlast any restart."""
    from dagster import AssetKey, DagsterEventType, DagsterInstance, DagsterRunStatus
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage

    root, env = deployment
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    instance = DagsterInstance.from_config(str(root / "dagster_home"))
    assert isinstance(instance.run_storage, PostgresRunStorage)
    assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
    before = {r.dagster_run.run_id for r in instance.get_run_records()}
    state = services.Services(root).state()
    services.stop_mlflow(services.Services(root), state)
    try:
        run_env = {**env, "KILN_WORK_DIR": str(tmp_path / "work"), "KILN_TRACKING_RETRY_DELAY": "1",
                   "KILN_TRACKING_RETRIES": "120"}  # fmt: skip
        proc = kiln("run", "--job", "data", "--profile", str(write_data_profile(tmp_path)), env=run_env)

        def retry_pending():
            new = [r.dagster_run.run_id for r in instance.get_run_records() if r.dagster_run.run_id not in before]
            return new and instance.all_logs(new[0], of_type=DagsterEventType.STEP_UP_FOR_RETRY)

        retried = wait_for("a stage waiting to retry", retry_pending, proc)
    finally:
        services.start_mlflow(services.Services(root), state)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    run_id = retried[0].run_id
    # the first stages to reach for the server (feedback_pairs reads the served traces from it)
    assert {event.step_key for event in retried} <= {"raw_corpus", "feedback_pairs"}
    assert instance.get_run_by_id(run_id).status == DagsterRunStatus.SUCCESS
    assert instance.get_latest_materialization_event(AssetKey("clean_corpus")).run_id == run_id

    uri = env["MLFLOW_TRACKING_URI"]
    c = client(uri)
    [run] = c.search_runs([experiment_id(c, "svc", uri)], f"tags.`kiln.pipeline_run_id` = '{run_id}'")
    assert run.data.metrics["raw_corpus.documents"] == 20
    assert run.data.metrics["clean_corpus.input_documents"] == 20
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # uploaded through the server
    stats = c.download_artifacts(run.info.run_id, "clean_corpus/stats.json", str(tmp_path))
    assert json.loads(Path(stats).read_text())["input_documents"] == 20
    assert list((root / "mlflow" / "artifacts").rglob("stats.json"))  # the server's own artifact store


def test_run_queue_keeps_training_runs_apart(deployment, monkeypatch):
    """The production instance's queue, applied by Dagster's own counter to the real jobs' run tags:
    a running training run holds back every other run that trains, not a data run; one run per group."""
    from types import SimpleNamespace

    from dagster import DagsterInstance
    from dagster._utils.tags import TagConcurrencyLimitsCounter

    import definitions

    root, env = deployment
    monkeypatch.setenv("KILN_DAGSTER_DATABASE_URL", env["KILN_DAGSTER_DATABASE_URL"])
    queue = DagsterInstance.from_config(str(root / "dagster_home")).run_coordinator.get_run_queue_config()

    def run(job: str):
        return SimpleNamespace(tags=definitions.defs.resolve_job_def(job).tags)

    def blocked(running: str, queued: str) -> bool:
        return TagConcurrencyLimitsCounter(list(queue.tag_concurrency_limits), [run(running)]).is_blocked(run(queued))

    for trains in ("kiln_pipeline", "post_training", "evaluation", "release"):
        assert blocked("training", trains)
    assert not blocked("training", "data")
    assert blocked("data", "data")


def test_only_a_lost_tracking_server_retries_a_stage(deployment, tmp_path):
    from dagster import RetryRequested

    from resources import MLflowTracking

    _, env = deployment
    live = MLflowTracking(tracking_uri=env["MLFLOW_TRACKING_URI"], system_metrics=False)
    # the server answers: the stage's own error, not retried
    with pytest.raises(ValueError, match="a bug"), live.stage("run-a", "tiny", "tokenizer"):
        raise ValueError("a bug")
    gone = MLflowTracking(tracking_uri=f"http://127.0.0.1:{services.free_port()}", system_metrics=False)
    with pytest.raises(RetryRequested), gone.stage("run-b", "tiny", "tokenizer"):
        pass


def test_served_answers_and_their_feedback_are_kept_on_the_tracking_server(deployment):
    """What `kiln serve` records against `make services`' MLflow server: the trace, then a user's rating."""
    from prometheus_client import CollectorRegistry

    from pipeline.data.feedback import log_judgement, tracing_client
    from pipeline.serve.tracing import TraceRecord, TraceWriter, new_trace_id

    _, env = deployment
    uri = env["MLFLOW_TRACKING_URI"]
    metrics = CollectorRegistry()
    writer = TraceWriter(uri, 1.0, 10, metrics, priority="0")
    trace_id = new_trace_id()
    writer.submit(TraceRecord(
        trace_id=trace_id, route="/v1/completions", request_id="r1", key_id="k1", status=200,
        started_ns=time.time_ns(), total_ms=5.0, queue_ms=0.0, ttft_ms=1.0, prompt_tokens=3, completion_tokens=2,
        preset="default", sent={"prompt": "mail jane.roe@example.com"}, model="kiln-services", version="1",
        alias="production", role="production",
        answer={"object": "text_completion", "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}]},
    ))  # fmt: skip
    assert writer.wait_written(trace_id, 600)
    writer.close()
    assert metrics.get_sample_value("kiln_traces_written_total") == 1, "the server refused the trace"
    log_judgement(uri, trace_id, "k1", rating="down", preferred_answer="call jane.roe@example.com")
    trace = tracing_client(uri).get_trace(trace_id)
    assert trace.data.spans[0].inputs == {"prompt": "mail <EMAIL>"}
    judged = {(a.name, str(a.value)) for a in trace.info.assessments}
    assert judged == {("rating", "down"), ("preferred_answer", "call <EMAIL>")}


def test_gpu_memory_utilisation_and_temperature_reach_the_server(request, monkeypatch):
    """On a machine with an NVIDIA GPU (and its driver): a stage's GPU system metrics on the server."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:
        pytest.skip(f"no NVIDIA GPU and driver on this machine to sample: {exc}")
    from resources import MLflowTracking

    _, env = request.getfixturevalue("deployment")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    tracking = MLflowTracking(tracking_uri=env["MLFLOW_TRACKING_URI"], system_metrics=True)
    with tracking.stage("gpu-run", "tiny", "base_model") as log:
        time.sleep(4)
    metrics = client(env["MLFLOW_TRACKING_URI"]).get_run(log.run_id).data.metrics
    for name in ("gpu_0_memory_usage_megabytes", "gpu_0_utilization_percentage", "gpu_0_temperature_celsius"):
        assert f"system/{name}" in metrics, sorted(metrics)


def test_a_services_folder_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert services.main(["up", "--dir", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kiln: error:")
    assert str(tmp_path / "file") in err
    assert err.count("\n") == 1
    assert services.main(["restart", "mlflow", "--dir", str(tmp_path / "none")]) == 2
    assert "make services" in capsys.readouterr().err
