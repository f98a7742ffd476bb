"""`kiln run`: the whole pipeline, handed to Dagster's own command line so the run is recorded in
DAGSTER_HOME exactly as one launched from the UI would be (and pipeline/ never imports Dagster)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from pipeline.cli.command import Command, add_profile
from pipeline.errors import KilnError
from pipeline.layout import DAGSTER_HOME, REPO_ROOT, Layout


class Run(Command):
    help = "materialize the whole pipeline with Dagster (what `make run` does)"
    description = "Runs a Dagster job over definitions.py; the run shows in `dagster dev` afterwards."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_profile(parser)
        parser.add_argument(
            "--job", default="kiln_pipeline", help="Dagster job to run (default: kiln_pipeline, every asset)"
        )

    def run(self, args: argparse.Namespace) -> int:
        from pipeline.config import load_profile

        profile = load_profile(args.profile)  # fail here, in one line, rather than inside Dagster
        chosen = args.profile or os.environ.get("KILN_PROFILE") or profile.name  # a name or a YAML file
        env = dict(os.environ, KILN_PROFILE=chosen)
        env.setdefault("DAGSTER_HOME", str(DAGSTER_HOME))
        prepare_dagster_home(Path(env["DAGSTER_HOME"]))
        dagster = Path(sys.executable).with_name("dagster")
        cmd = [str(dagster), "job", "execute", "-f", str(REPO_ROOT / "definitions.py"), "-j", args.job]
        print("running:", " ".join(cmd), file=sys.stderr)
        code = subprocess.call(cmd, cwd=REPO_ROOT, env=env)
        if code != 0:
            raise KilnError(f"the Dagster run of job {args.job!r} failed (exit {code}); its logs are in the Dagster UI")
        print(done_message(chosen, profile.name, env["DAGSTER_HOME"]), file=sys.stderr)
        return 0


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
