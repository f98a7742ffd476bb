"""`kiln run`: the whole pipeline, handed to Dagster's own command line so the run is recorded in
DAGSTER_HOME exactly as one launched from the UI would be (and pipeline/ never imports Dagster)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.cli.command import Command, add_profile
from pipeline.errors import KilnError
from pipeline.layout import DAGSTER_HOME, REPO_ROOT, Layout
from pipeline.reuse import FORCE_TAG, time_table, timings_since

# One process for every step (run.max_concurrent 1, the default): on a few cores a process per step
# spends more time importing torch and Dagster than the stages overlap, and an unchanged re-run
# would be mostly that.
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}


def execution_config(max_concurrent: int) -> dict:
    """The run config's executor: in one process, or with `max_concurrent` > 1 Dagster's
    multiprocess executor running independent steps side by side, steps tagged `kiln/compute:
    accelerator` (assets/stage.py) one at a time."""
    if max_concurrent <= 1:
        return IN_PROCESS
    limits = [{"key": "kiln/compute", "value": "accelerator", "limit": 1}]
    multiprocess = {"max_concurrent": max_concurrent, "tag_concurrency_limits": limits}
    return {"execution": {"config": {"multiprocess": multiprocess}}}


class Run(Command):
    help = "materialize the whole pipeline with Dagster (what `make run` does)"
    description = (
        "Runs a Dagster job over definitions.py; the run shows in `dagster dev` afterwards. A stage whose code, "
        "settings and input files are unchanged since its last finished run reuses that result, and a model "
        "already in the registry is not registered again; --force computes and registers everything."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_profile(parser)
        parser.add_argument(
            "--job", default="kiln_pipeline", help="Dagster job to run (default: kiln_pipeline, every asset)"
        )
        parser.add_argument(
            "--force", action="store_true",
            help="compute every stage again and register a new version even when nothing changed (make run FORCE=1)",
        )  # fmt: skip

    def run(self, args: argparse.Namespace) -> int:
        from pipeline.config import load_profile

        profile = load_profile(args.profile)  # fail here, in one line, rather than inside Dagster
        chosen = args.profile or os.environ.get("KILN_PROFILE") or profile.name  # a name or a YAML file
        env = dict(os.environ, KILN_PROFILE=chosen)
        env.setdefault("DAGSTER_HOME", str(DAGSTER_HOME))
        prepare_dagster_home(Path(env["DAGSTER_HOME"]))
        started, clock = time.time(), time.monotonic()
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="kiln-run-") as config:
            json.dump(execution_config(profile.run.max_concurrent), config)  # JSON is YAML
            config.flush()
            cmd = dagster_command(args.job, config.name, args.force)
            print("running:", " ".join(cmd), file=sys.stderr)
            code = subprocess.call(cmd, cwd=REPO_ROOT, env=env)
        layout = Layout.for_profile(profile.name)
        table = time_table(timings_since(layout.timings, started), time.monotonic() - clock)
        if code != 0:
            print(table, file=sys.stderr)
            raise KilnError(f"the Dagster run of job {args.job!r} failed (exit {code}); its logs are in the Dagster UI")
        print(f"\n{table}", file=sys.stderr)
        print(done_message(chosen, profile.name, env["DAGSTER_HOME"]), file=sys.stderr)
        return 0


def dagster_command(job: str, config: str, force: bool) -> list[str]:
    """Dagster's command line for one run of `job` with the run config file `config`; `force` tags
    the run so that every stage computes and the model is registered whatever the registry holds."""
    dagster = Path(sys.executable).with_name("dagster")
    cmd = [str(dagster), "job", "execute", "-f", str(REPO_ROOT / "definitions.py"), "-j", job, "-c", config]
    return cmd + (["--tags", json.dumps({FORCE_TAG: "true"})] if force else [])


def prepare_dagster_home(home: Path) -> None:
    """Sqlite storage in DAGSTER_HOME (Dagster's default), and no telemetry calls."""
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")


def done_message(chosen: str, name: str, dagster_home: str) -> str:
    """Where a finished run's artifacts, runs and versions are: the same Layout the assets wrote through."""
    server = os.environ.get("MLFLOW_TRACKING_URI", "")
    if server.startswith("http"):  # a tracking server (make services): its own UI, the Dagster UI beside it
        dagster_ui, mlflow_ui = "the dagster-webserver URL of make services-status (", f"{server}  ("
    else:
        dagster_ui, mlflow_ui = "make ui         (http://127.0.0.1:3000; ", "make mlflow-ui  (http://127.0.0.1:5000; "
    return (
        f"\nkiln: pipeline done on profile {chosen!r}.\n"
        f"  artifacts:     {Layout.for_profile(name).root}\n"
        f"  Dagster UI:    {dagster_ui}runs are in DAGSTER_HOME={dagster_home})\n"
        f"  MLflow UI:     {mlflow_ui}experiment kiln-{name})\n"
        f"  versions:      .venv/bin/kiln models --profile {chosen}\n"
    )
