"""Dagster resources: which profile a deployment runs, and where it writes."""

from resources.kiln import KilnSettings

__all__ = ["KilnSettings"]
