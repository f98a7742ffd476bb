"""The compute profile and the artifact folder, as one Dagster resource."""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from pipeline.profiles import Profile, load_profile

REPO_ROOT = Path(__file__).resolve().parent.parent


class KilnSettings(ConfigurableResource):
    """Which profile the assets run with, and where their artifacts go."""

    profile: str = Field(default="tiny", description="a built-in profile name (tiny, small, 300m) or a YAML file")
    work_dir: str = Field(default=str(REPO_ROOT / "data" / "work"), description="root folder of the artifacts")

    def load(self) -> Profile:
        return load_profile(self.profile)

    def stage_dir(self, stage: str) -> Path:
        """data/work/<profile>/<stage>: one folder per asset, per profile."""
        path = Path(self.work_dir) / self.load().name / stage
        path.mkdir(parents=True, exist_ok=True)
        return path
