"""The compute profile and the artifact folder, as one Dagster resource."""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from pipeline.config import Profile, load_profile
from pipeline.layout import DEFAULT_WORK_DIR, Layout


class KilnSettings(ConfigurableResource):
    """Which profile the assets run with, and where their artifacts go."""

    profile: str = Field(default="tiny", description="a built-in profile name (tiny, small, 300m) or a YAML file")
    work_dir: str = Field(default=str(DEFAULT_WORK_DIR), description="root folder of the artifacts")

    def load(self) -> Profile:
        return load_profile(self.profile)

    @property
    def layout(self) -> Layout:
        """Every artifact path of this profile under work_dir."""
        return self.load_with_layout()[1]

    def load_with_layout(self) -> tuple[Profile, Layout]:
        """The profile and its artifact paths, the profile read once."""
        profile = self.load()
        return profile, Layout(Path(self.work_dir), profile.name)
