"""MLflow as a Dagster resource: where runs and models are tracked."""

import contextlib
import os
from contextlib import nullcontext

from dagster import ConfigurableResource, RetryRequested
from pydantic import Field

from pipeline import logs
from pipeline.tracking import StageLogger, default_tracking_uri, gpu_temperatures, pipeline_run, server_unavailable

# A stage that loses the tracking server (a restart, a network blip) is retried after a wait instead of
# failing the run; any other error fails it at once, as before.
RETRIES = int(os.environ.get("KILN_TRACKING_RETRIES", "5"))
RETRY_DELAY_S = float(os.environ.get("KILN_TRACKING_RETRY_DELAY", "15"))


class MLflowTracking(ConfigurableResource):
    """MLflow tracking and registry: sqlite under registry/ by default, any server by URI."""

    tracking_uri: str = Field(default_factory=default_tracking_uri, description="MLflow tracking/registry URI")
    system_metrics: bool = Field(default=True, description="log CPU, memory (and GPU) usage while a stage runs")

    @contextlib.contextmanager
    def stage(self, dagster_run_id: str, profile: str, stage: str):
        """Log one stage into the MLflow run of this Dagster run; system metrics while it works. A
        tracking server out of reach asks Dagster to retry the stage (RETRIES times, RETRY_DELAY_S apart)."""
        import mlflow

        logs.configure()  # the stage's lines carry its Dagster run id and name
        logs.bind(run_id=dagster_run_id, stage=stage)
        with self._retried():
            run_id = pipeline_run(self.tracking_uri, profile, dagster_run_id)
            mlflow.set_tracking_uri(self.tracking_uri)
            os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "5")
            every_s = float(os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"])
            temperatures = (
                gpu_temperatures(self.tracking_uri, run_id, every_s) if self.system_metrics else nullcontext()
            )
            with mlflow.start_run(run_id=run_id, log_system_metrics=self.system_metrics), temperatures:
                yield StageLogger(self.tracking_uri, run_id, stage)

    def reused(self, dagster_run_id: str, profile: str, stage: str, metrics: dict, from_run: str) -> None:
        """A reused stage in this Dagster run's MLflow run: its stored metrics, and the tags
        `<stage>.reused` and `<stage>.reused_from_run` (the Dagster run that computed them). Two
        calls to the store, no system metrics: a reused stage does no work worth sampling."""
        with self._retried():
            log = StageLogger(self.tracking_uri, pipeline_run(self.tracking_uri, profile, dagster_run_id), stage)
            log.metrics(metrics)
            log.tags({"reused": "true", "reused_from_run": from_run})

    @contextlib.contextmanager
    def _retried(self):
        """A tracking server out of reach asks Dagster to retry the stage; any other error fails it."""
        try:
            yield
        except Exception as exc:
            if not server_unavailable(self.tracking_uri, exc):
                raise
            logs.get("system").warning("tracking server unavailable", uri=self.tracking_uri, retry_in_s=RETRY_DELAY_S)
            raise RetryRequested(max_retries=RETRIES, seconds_to_wait=RETRY_DELAY_S) from exc
