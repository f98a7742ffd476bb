"""Scheduled retraining and the new-data sensor."""

import os

from dagster import DefaultScheduleStatus, RunRequest, SensorEvaluationContext, SkipReason, sensor

from pipeline.config import load_profile
from pipeline.data.ingest import data_fingerprint, watched_files

RETRAIN_CRON = os.environ.get("KILN_RETRAIN_CRON", "0 3 * * 1")  # Mondays 03:00 by default


def retrain_schedule(job):
    from dagster import ScheduleDefinition

    return ScheduleDefinition(
        name="weekly_retrain",
        job=job,
        cron_schedule=RETRAIN_CRON,
        description="Materialize the whole pipeline (cron from KILN_RETRAIN_CRON).",
        default_status=DefaultScheduleStatus.STOPPED,  # turned on in the UI or by the deployment
    )


def new_data_sensor(job):
    @sensor(job=job, name="new_raw_data", minimum_interval_seconds=60, description="Retrain when raw files change.")
    def new_raw_data(context: SensorEvaluationContext):
        """Watch the profile's path sources; a new or changed file requests one run (its run key
        is made from file names and modification times, so the same files trigger once)."""
        files = watched_files(load_profile().corpus.sources)
        if not files:
            return SkipReason("the profile has no path sources to watch")
        return RunRequest(run_key=data_fingerprint(files), tags={"kiln.trigger": "new_raw_data"})

    return new_raw_data
