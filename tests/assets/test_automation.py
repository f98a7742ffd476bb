"""The weekly schedule, the new-data and new-feedback sensors and the deployment's resources."""

import os

import pytest
from dagster import RunRequest, build_sensor_context

import definitions


def test_schedule_is_weekly_over_the_whole_pipeline():
    (schedule,) = definitions.defs.schedules
    assert schedule.cron_schedule == "0 3 * * 1"
    assert schedule.job_name == "kiln_pipeline"


def test_sensor_requests_one_run_per_change(tmp_path, monkeypatch):
    data = tmp_path / "raw"
    data.mkdir()
    (data / "a.txt").write_text("first file")
    profile = tmp_path / "p.yaml"
    profile.write_text(f"base: tiny\ncorpus:\n  sources:\n    - {{path: {data}}}\n")
    monkeypatch.setenv("KILN_PROFILE", str(profile))
    sensor = next(s for s in definitions.defs.sensors if s.name == "new_raw_data")

    def key():
        result = sensor.evaluate_tick(build_sensor_context())
        assert len(result.run_requests) == 1
        assert isinstance(result.run_requests[0], RunRequest)
        return result.run_requests[0].run_key

    first = key()
    assert key() == first  # the same files: the same run key, which Dagster runs once
    (data / "b.txt").write_text("a new file")
    second = key()
    assert second != first
    os.utime(data / "a.txt", (1_000_000, 1_000_000))  # a changed file
    assert key() not in (first, second)

    profile.write_text("base: tiny\n")  # builtin sources only: nothing to watch
    result = sensor.evaluate_tick(build_sensor_context())
    assert not result.run_requests
    assert result.skip_message


def test_production_deployment_needs_its_locations(monkeypatch):
    monkeypatch.delenv("KILN_WORK_DIR", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(RuntimeError, match="KILN_WORK_DIR, MLFLOW_TRACKING_URI"):
        definitions.resources_for("production")
    monkeypatch.setenv("KILN_WORK_DIR", "/srv/kiln")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    res = definitions.resources_for("production")
    assert res["kiln"].work_dir == "/srv/kiln"
    assert res["mlflow"].tracking_uri == "http://127.0.0.1:5000"
