"""Shapes for materialization metadata (Markdown tables, inline pictures), and the same figures
logged to MLflow."""

from __future__ import annotations

import base64

from dagster import MetadataValue, TableColumn, TableRecord, TableSchema


def md_table(rows: dict, key: str, value: str) -> MetadataValue:
    lines = [f"| {key} | {value} |", "|---|---:|"] + [f"| {k} | {v:,} |" for k, v in rows.items()]
    return MetadataValue.md("\n".join(lines) if rows else f"(no {value})")


def table(columns: list[str], rows: list[list]) -> MetadataValue:
    """Dagster's own table (sortable in the UI, not Markdown behind a button); cells as text, so a
    figure keeps the digits it was rounded to."""
    schema = TableSchema(columns=[TableColumn(name=c, type="string") for c in columns])
    cells = [{c: "—" if v is None else str(v) for c, v in zip(columns, row, strict=True)} for row in rows]
    records = [TableRecord(c) for c in cells]
    return MetadataValue.table(records, schema=schema)


def md_image(png: bytes, alt: str) -> MetadataValue:
    """A PNG shown inline in the Dagster UI's metadata panel."""
    return MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


def log_to_mlflow(log, metadata: dict, params=None, files=(), images=None, history=None, history_keys=()) -> None:
    """Log a stage into MLflow: numeric metadata as metrics, its settings as parameters, files and
    pictures as artifacts, per-step rows as metric curves."""
    import dataclasses

    numbers = {k: v for k, v in metadata.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    log.metrics(numbers)
    if params is not None:
        log.params(dataclasses.asdict(params) if dataclasses.is_dataclass(params) else params)
    for f in files:
        log.artifact(f)
    for name, png in (images or {}).items():
        log.image(png, name)
    if history:
        log.history(history, history_keys)
