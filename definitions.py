"""The one Dagster code location of kiln: assets, checks, jobs and resources.

The resources are chosen by environment: KILN_PROFILE picks the profile (tiny by default),
KILN_WORK_DIR where the artifacts go (data/work by default), MLFLOW_TRACKING_URI where runs and
models are tracked (sqlite under registry/ by default; a tracking server in production).
"""

import os

from dagster import (
    AssetSelection,
    Definitions,
    define_asset_job,
    load_asset_checks_from_modules,
    load_assets_from_modules,
)

from assets import corpus, evaluation, feedback, post_training, release, training
from assets.automation import new_data_sensor, new_feedback_sensor, retrain_schedule
from pipeline.layout import work_dir_from_env
from resources import KilnSettings, MLflowTracking
from resources.logs import kiln_console

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

STAGE_MODULES = [corpus, feedback, training, post_training, evaluation, release]


def kiln_job(name: str, selection, description: str, compute: str):
    """A job whose runs carry the tags the production run queue limits (pipeline/deploy/services.py): one run
    per `kiln/group` at a time, and one `kiln/compute: accelerator` run (training, evaluation,
    benchmarks) on the machine's cores or GPU at a time. Its run logs use kiln's logging set-up."""
    return define_asset_job(
        name, selection=selection, description=description, tags={"kiln/group": name, "kiln/compute": compute},
        config={"loggers": {"console": {}}},  # kiln_console below: Dagster's run logs in kiln's format
    )  # fmt: skip


kiln_pipeline = kiln_job("kiln_pipeline", AssetSelection.all(), "Every asset, from sources to registry.", "accelerator")
data_job = kiln_job("data", AssetSelection.groups("data"), "raw_corpus and clean_corpus.", "cpu")
training_job = kiln_job("training", AssetSelection.groups("training"), "tokenizer and base_model.", "accelerator")
post_training_job = kiln_job(
    "post_training", AssetSelection.groups("post_training"), "SFT and DPO data and models.", "accelerator"
)
evaluation_job = kiln_job("evaluation", AssetSelection.groups("evaluation"), "eval_report and its gate.", "accelerator")
release_job = kiln_job(
    "release", AssetSelection.groups("release"), "GGUF files, their benchmark, the registered version.", "accelerator"
)
feedback_retrain_job = kiln_job(
    "feedback_retrain",
    AssetSelection.assets("feedback_pairs") | AssetSelection.groups("post_training", "evaluation", "release"),
    "Users' judgements as preference pairs, then DPO, evaluation and a new candidate version.",
    "accelerator",
)


def resources_for(deployment: str) -> dict:
    """local (the default): everything inside the checkout. production: every location from the
    environment, and a missing one is an error at load time rather than a run writing locally."""
    if deployment == "production":
        missing = [v for v in ("KILN_WORK_DIR", "MLFLOW_TRACKING_URI") if not os.environ.get(v)]
        if missing:
            raise RuntimeError(f"KILN_DEPLOYMENT=production needs {', '.join(missing)} set")
        work_dir = os.environ["KILN_WORK_DIR"]
    else:
        work_dir = str(work_dir_from_env())
    return {
        "kiln": KilnSettings(profile=os.environ.get("KILN_PROFILE", "tiny"), work_dir=work_dir),
        "mlflow": MLflowTracking(),  # MLFLOW_TRACKING_URI, else sqlite under registry/
    }


defs = Definitions(
    assets=load_assets_from_modules(STAGE_MODULES),
    asset_checks=load_asset_checks_from_modules(STAGE_MODULES),
    jobs=[kiln_pipeline, data_job, training_job, post_training_job, evaluation_job, release_job, feedback_retrain_job],
    schedules=[retrain_schedule(kiln_pipeline)],
    sensors=[new_data_sensor(kiln_pipeline), new_feedback_sensor(feedback_retrain_job)],
    resources=resources_for(os.environ.get("KILN_DEPLOYMENT", "local")),
    loggers={"console": kiln_console},  # the jobs' run logs as kiln's structured lines (KILN_LOG_FORMAT)
)
