"""Scheduled retraining, the new-data sensor and the new-feedback sensor."""

import os

from dagster import DefaultScheduleStatus, RunRequest, SensorEvaluationContext, SkipReason, sensor

from pipeline.config import load_profile
from pipeline.data.feedback import count_new_judgements
from pipeline.data.ingest import data_fingerprint, watched_files
from pipeline.release.registry import model_name
from resources import KilnSettings, MLflowTracking

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


def feedback_min() -> int:
    """KILN_FEEDBACK_MIN (default 50), read at each tick so a deployment can change it without a reload."""
    return int(os.environ.get("KILN_FEEDBACK_MIN", "50"))


def new_feedback_sensor(job):
    @sensor(
        job=job, name="new_feedback", minimum_interval_seconds=300,
        description="Retrain post-training and release when users have judged enough served answers.",
    )  # fmt: skip
    def new_feedback(context: SensorEvaluationContext, kiln: KilnSettings, mlflow: MLflowTracking):
        """Count the judgements (ratings, preferred answers, side-by-side picks) given on the served
        traces since the last run it requested; at KILN_FEEDBACK_MIN (default 50) request one run of
        feedback_pairs, post-training, evaluation and release. The new version registers as
        `candidate`, never `production`: promoting it stays a person's decision."""
        since, needed = int(context.cursor or 0), feedback_min()
        count, newest = count_new_judgements(mlflow.tracking_uri, model_name(kiln.load().name), since)
        if count < needed:
            return SkipReason(f"{count} new judgements since the last retrain; it takes {needed}")
        context.update_cursor(str(newest))
        tags = {"kiln.trigger": "new_feedback", "kiln.judgements": str(count)}
        return RunRequest(run_key=f"feedback-{newest}", tags=tags)

    return new_feedback
