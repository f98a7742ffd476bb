"""Thin Dagster assets and asset checks, one module per stage. The work is in `pipeline/`."""
