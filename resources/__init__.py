"""Dagster resources: which profile a deployment runs, where it writes, where it tracks."""

from resources.kiln import KilnSettings
from resources.tracking import MLflowTracking

__all__ = ["KilnSettings", "MLflowTracking"]
