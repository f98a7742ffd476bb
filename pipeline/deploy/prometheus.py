"""Prometheus for `make services`: Debian's `prometheus` package, scraping every `kiln serve` that runs.

A gateway announces itself by writing `<targets>/kiln-serve-<port>.json` when it starts listening
(KILN_PROMETHEUS_TARGETS, which `make services` prints) and removing it when it stops; Prometheus
reads that folder (file-based service discovery), so the gateway's series appear and disappear with
it, under `job="kiln"`. The alert rules are deploy/prometheus/rules.yml (copied in at each start).

    prometheus/prometheus.yml   the scrape config written here
    prometheus/rules.yml        the alert and recording rules
    prometheus/targets/         one JSON file per running gateway
    prometheus/data/            the time-series database
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from pipeline.deploy.apt import apt_install
from pipeline.errors import KilnError
from pipeline.io import atomic_path
from pipeline.layout import PROMETHEUS_DIR

SCRAPE_S = 5  # a canary decided in minutes needs series finer than the default minute
RETENTION = "15d"


def ensure_prometheus() -> str:
    """The prometheus binary, installed from Debian's `prometheus` package when missing and root (as the
    Makefile's `prometheus` target does); a KilnError saying how to install it otherwise."""
    apt_said = apt_install("prometheus", recommends=False) if shutil.which("prometheus") is None else ""
    found = shutil.which("prometheus")
    if found is None:
        why = f" (apt-get install prometheus: {apt_said})" if apt_said else ""
        raise KilnError(f"Prometheus is not installed: sudo apt-get install -y prometheus (Debian's package){why}")
    return found


def write_config(folder: Path) -> Path:
    """prometheus.yml scraping the gateways announced in `folder/targets`, with kiln's rules."""
    (folder / "targets").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(PROMETHEUS_DIR / "rules.yml", folder / "rules.yml")
    config = {
        "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
        "rule_files": [str(folder / "rules.yml")],
        "scrape_configs": [
            {
                "job_name": "kiln",
                "file_sd_configs": [{"files": [str(folder / "targets" / "*.json")], "refresh_interval": "5s"}],
            }
        ],
    }
    with atomic_path(folder / "prometheus.yml") as tmp:
        tmp.write_text(
            f"# written by `python -m pipeline.deploy.services up`\n{yaml.safe_dump(config, sort_keys=False)}"
        )
    return folder / "prometheus.yml"


def command(folder: Path, port: int) -> list[str]:
    """The Prometheus server on loopback `port`, its data in `folder/data`."""
    return [
        ensure_prometheus(), f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
        f"--storage.tsdb.retention.time={RETENTION}", f"--web.listen-address=127.0.0.1:{port}",
        "--web.enable-lifecycle",
    ]  # fmt: skip
