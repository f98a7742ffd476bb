"""One logging set-up for the `kiln` command, the Dagster assets and `kiln serve` (structlog).

`configure()` is called once by each entry point; after it, kiln's structured events and every
library's `logging` records go to stderr in one format:

    KILN_LOG_FORMAT=json      one JSON object per line, for Promtail/Loki:
                              {"timestamp", "level", "type", "event", "run_id", "stage", ...fields}
    KILN_LOG_FORMAT=console   readable lines (the default when stderr is a terminal; json otherwise)

`type` says what the line is about: `training` (a step: step, loss, lr, tokens_per_s; an
evaluation), `inference` (one served request: request_id, status, prompt_tokens,
completion_tokens, queue_ms, ttft_ms, total_ms), `api` (the server's own routes: reloads) or
`system` (everything else). `run_id` and `stage` are the Dagster run and the asset inside a
pipeline run, a fresh id and the subcommand for `kiln` itself. Training steps are logged at debug
level: every step in JSON, while a terminal shows the progress bar instead.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid

import structlog

TYPES = ("training", "inference", "api", "system")
# the type of plain `logging` records, by logger name (the first match, so the longer name first)
LOGGER_TYPES = {"kiln.serve.access": "inference", "kiln.serve": "api", "uvicorn": "api", "kiln.training": "training"}


def get(kind: str):
    """A logger for one type of event: `logs.get("training").info("evaluation", step=10, val_loss=2.1)`."""
    assert kind in TYPES, kind
    return structlog.get_logger(f"kiln.{kind}", type=kind)  # lazy: resolved by the configure() in force


def bind(run_id: str | None = None, stage: str | None = None) -> None:
    """Stamp every later line of this process (and task) with the run and the stage."""
    structlog.contextvars.bind_contextvars(run_id=run_id or uuid.uuid4().hex[:12], stage=stage)


_active = {"format": None}  # the format configure() set in this process


def json_lines() -> bool:
    """True once configure() chose JSON: progress bars then stay off, as their carriage returns would
    run into the JSON lines on the same stream (and a log collector has no use for them)."""
    return _active["format"] == "json"


def log_format(stream=None) -> str:
    chosen = os.environ.get("KILN_LOG_FORMAT", "").strip().lower()
    if chosen in ("json", "console"):
        return chosen
    return "console" if (stream or sys.stderr).isatty() else "json"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a line is logged: pytest and Dagster swap it."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _typed(logger, method: str, event: dict) -> dict:
    """Every line has a type, a run id and a stage, null where unknown (Loki labels stay uniform)."""
    if "type" not in event:
        record = event.get("_record")
        name = record.name if record else ""
        event["type"] = next(
            (t for prefix, t in LOGGER_TYPES.items() if name == prefix or name.startswith(prefix + ".")), "system"
        )
    event.setdefault("run_id", None)
    event.setdefault("stage", None)
    return event


def _dagster_fields(logger, method: str, event: dict) -> dict:
    """A Dagster run log record (resources/logs.py) carries its run, step, job and event type in
    `dagster_meta`: they become fields, and the message without Dagster's prefix the event."""
    meta = getattr(event.get("_record"), "dagster_meta", None)
    if isinstance(meta, dict):
        dagster_event = meta.get("dagster_event")
        event.update(
            run_id=meta.get("run_id"), stage=meta.get("step_key"), job=meta.get("job_name"),
            event=meta.get("orig_message") or event.get("event"),
            dagster_event=getattr(dagster_event, "event_type_value", None),
        )  # fmt: skip
    return event


def _lift_json(logger, method: str, event: dict) -> dict:
    """A plain record whose message is a JSON object (the gateway's request line) becomes its fields."""
    message = event.get("event")
    if isinstance(message, str) and message.startswith("{"):
        try:
            fields = json.loads(message)
        except ValueError:
            return event
        if isinstance(fields, dict):
            event.update(fields)
            event["event"] = "request"
    return event


def configure(fmt: str | None = None, level: int = logging.INFO) -> str:
    """Route structlog and the standard `logging` through one stderr handler in `fmt` (default from
    KILN_LOG_FORMAT). Safe to call again: the handler is replaced, not added twice. Returns the format."""
    fmt = _active["format"] = fmt or log_format()
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, _typed, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,  # configure() may run again with another format
    )
    renderer = (
        structlog.processors.JSONRenderer(default=str)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    handler = _StderrHandler()
    handler.kiln = True
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, _dagster_fields, _lift_json, _typed],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "kiln", False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)  # libraries' info lines (migrations, HTTP) stay out, as before
    logging.getLogger("kiln").setLevel(level)
    # every training step in JSON; on a console the progress bar shows them
    logging.getLogger("kiln.training").setLevel(logging.DEBUG if fmt == "json" else logging.INFO)
    return fmt
