"""Reuse by inputs for every asset (pipeline/reuse.py), in the same few lines each:

    stage = Stage.start(context, layout, config, settings, inputs=[...])
    if stage.reused:
        return stage.reuse()
    ...                                   # compute
    return stage.finish(metadata)

A reused result keeps its data version (the stage key), so nothing downstream turns stale, and
its stored metrics are logged again into this run's MLflow run, tagged `<stage>.reused`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from dagster import AssetExecutionContext, Config, DataVersion, MaterializeResult, deserialize_value, serialize_value
from pydantic import Field

from pipeline import reuse
from pipeline.layout import Layout

# Op tags the multiprocess executor limits (pipeline/cli/run.py): steps that take the GPU, or
# every core on a machine without one, run one at a time; light ones beside them.
COMPUTE_TAG = "kiln/compute"
ACCELERATOR = {COMPUTE_TAG: "accelerator"}
CPU = {COMPUTE_TAG: "cpu"}


class StageConfig(Config):
    """Run config of every asset that reuses stored results (Launchpad: ops.<asset>.config.force)."""

    force: bool = Field(default=False, description="compute again even when a stored result has the same key")


def forced(context: AssetExecutionContext, config: StageConfig) -> bool:
    """Compute regardless: this asset's run config says so, or the whole run is tagged (kiln run --force)."""
    return config.force or context.run.tags.get(reuse.FORCE_TAG) == "true"


@dataclass
class Stage:
    context: AssetExecutionContext
    layout: Layout
    folder: Path
    key: str
    record: dict | None  # the stored result this run reuses; None when it computes
    started: float = field(default_factory=time.monotonic)
    cpu_started: float = field(default_factory=reuse.cpu_seconds)

    @classmethod
    def start(
        cls, context: AssetExecutionContext, layout: Layout, config: StageConfig | None, settings, inputs: list[Path]
    ) -> Stage:
        """Key this stage by code version, `settings` and the content of `inputs`; look for a
        stored result with that key (unless config.force, or config is None: always compute)."""
        started, cpu_started = time.monotonic(), reuse.cpu_seconds()  # hashing the inputs counts too
        name = context.asset_key.path[-1]
        folder = layout.stage(name)
        code_version = context.assets_def.code_versions_by_key[context.asset_key] or ""
        hashes = reuse.HashCache(layout.hash_cache)
        key = reuse.stage_key(code_version, settings, inputs, hashes)
        record = reuse.finished(folder, key, hashes) if config is not None and not forced(context, config) else None
        if record is None:
            reuse.forget(folder)
        return cls(context, layout, folder, key, record, started, cpu_started)

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def reused(self) -> bool:
        return self.record is not None

    def reuse(self) -> MaterializeResult:
        """The stored result again, marked as reused, under its old data version."""
        r = self.record
        unchanged = f"{self.name}: inputs, settings and code unchanged (key {self.key})"
        self.context.log.info(f"{unchanged}: reusing the result of run {r['run_id']}")
        stored = deserialize_value(r["metadata"], dict)
        tracking = getattr(self.context.resources, "mlflow", None)
        if tracking is not None:  # this run's MLflow run shows every stage's figures, reused or not
            tracking.reused(self.context.run.run_id, self.layout.profile, self.name, stored, r["run_id"])
        self._log_time(reused=True)
        metadata = {**stored, "reused": True, "reused_from_run": r["run_id"], "stage_key": self.key}
        return MaterializeResult(metadata=metadata, data_version=DataVersion(self.key))

    def finish(self, metadata: dict, data_version: str | None = None) -> MaterializeResult:
        """Record the computed result (last: its outputs are all in place) and return it. The data
        version is the key unless the stage names a content-based one."""
        run_id = self.context.run.run_id
        seconds, hashes = time.monotonic() - self.started, reuse.HashCache(self.layout.hash_cache)
        reuse.remember(self.folder, self.key, run_id, seconds, serialize_value(metadata), hashes)
        self._log_time(reused=False)
        metadata = {**metadata, "reused": False, "stage_key": self.key}
        return MaterializeResult(metadata=metadata, data_version=DataVersion(data_version or self.key))

    def _log_time(self, reused: bool) -> None:
        seconds, cpu = time.monotonic() - self.started, reuse.cpu_seconds() - self.cpu_started
        reuse.log_timing(self.layout.timings, self.name, self.context.run.run_id, seconds, cpu, reused)
