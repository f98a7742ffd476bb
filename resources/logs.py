"""Dagster's own run logs through kiln's logging set-up (pipeline/logs.py): with
KILN_LOG_FORMAT=json, every line a run prints (Dagster's events, `context.log` in the assets) is one
JSON object with the run id, the step as `stage`, the job and the Dagster event type."""

import logging

from dagster import InitLoggerContext, logger

from pipeline import logs


@logger(description="Dagster's run logs as kiln's structured lines (JSON under KILN_LOG_FORMAT=json).")
def kiln_console(init_context: InitLoggerContext) -> logging.Logger:
    logs.configure()
    run_log = logging.getLogger("kiln.dagster")  # no handler of its own: kiln's root handler writes it
    run_log.setLevel(logging.DEBUG)  # as Dagster's console logger: every event, step starts included
    return run_log
