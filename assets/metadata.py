"""Shapes for materialization metadata: Markdown tables and inline pictures."""

from __future__ import annotations

import base64

from dagster import MetadataValue


def md_table(rows: dict, key: str, value: str) -> MetadataValue:
    lines = [f"| {key} | {value} |", "|---|---:|"] + [f"| {k} | {v:,} |" for k, v in rows.items()]
    return MetadataValue.md("\n".join(lines) if rows else f"(no {value})")


def md_image(png: bytes, alt: str) -> MetadataValue:
    """A PNG shown inline in the Dagster UI's metadata panel."""
    return MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")
