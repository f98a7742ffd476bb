"""Render Prometheus's graph of a canary beside production (docs/canary-prometheus.png).

    .venv/bin/python docs/deploy/canary_screenshot.py --production GOOD.gguf --canary BAD.gguf

A throwaway sqlite registry in a temporary folder holds the two files as versions 1 (production) and
2; Prometheus (pipeline/deploy/services.py, as `make services` starts it) scrapes a `kiln serve
--canary 2 --canary-auto` fed by a few clients for `--seconds`; headless Chromium (Debian's
`chromium`) then saves the classic graph page of the per-version request rate and empty-answer share.
Everything started here is stopped at the end, by process id.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.deploy import services  # noqa: E402
from pipeline.io import free_port  # noqa: E402
from pipeline.layout import PROMETHEUS_TARGETS_ENV  # noqa: E402

ROLE = " * on (version) group_left (role) max by (version, role) (kiln_served_version)"
GRAPHS = (
    "sum by (version) (rate(kiln_version_requests_total[30s]))" + ROLE,
    "sum by (version) (rate(kiln_empty_answers_total[30s])) / sum by (version) (rate(kiln_answers_total[30s]))",
)


def registry(folder: Path, production: Path, canary: Path) -> tuple[str, Path]:
    from pipeline.release import registry
    from pipeline.tracking import pipeline_run

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    for n, gguf in ((1, production), (2, canary)):
        bundle = folder / f"bundle{n}"
        (bundle / "gguf").mkdir(parents=True)
        shutil.copyfile(gguf, bundle / "gguf" / "kiln-demo-Q4_K_M.gguf")
        registry.register(uri, "demo", pipeline_run(uri, "demo", f"run-{n}"), bundle, {}, gate_passed=True)
    registry.promote(uri, "demo", "1")
    profile = folder / "demo.yaml"
    profile.write_text("base: tiny\n")
    return uri, profile


def clients(url: str, stop: threading.Event, counts: dict) -> None:
    i = 0
    while not stop.is_set():
        body = json.dumps({"prompt": "x", "max_tokens": 8, "temperature": 0, "user": f"user-{i}"}).encode()
        req = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                counts[resp.status] = counts.get(resp.status, 0) + 1
        except OSError as exc:
            counts[str(exc)] = counts.get(str(exc), 0) + 1
        i += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--production", type=Path, required=True, metavar="GGUF")
    parser.add_argument("--canary", type=Path, required=True, metavar="GGUF")
    parser.add_argument("--seconds", type=float, default=150)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "canary-prometheus.png")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kiln-canary-shot-"))
    s = services.Services(tmp / "services")
    s.root.mkdir()
    state = {"prometheus_port": free_port()}
    serve, stop = None, threading.Event()
    try:
        uri, profile = registry(tmp, args.production, args.canary)
        services.start_prometheus(s, state)
        port = free_port()
        env = {**os.environ, PROMETHEUS_TARGETS_ENV: str(s.prometheus / "targets"), "KILN_CACHE_DIR": str(tmp / "c"),
               "KILN_REPLICAS": "1", "KILN_THREADS": "1", "KILN_CANARY_MIN_REQUESTS": "150"}  # fmt: skip
        serve = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "serve", "--profile", str(profile), "--tracking-uri", uri,
             "--canary", "2", "--canary-share", "0.3", "--canary-auto", "--port", str(port)],
            cwd=ROOT, env=env, stderr=open(tmp / "serve.log", "w"),  # noqa: SIM115 (lives as long as the child it serves)
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/", timeout=2) as resp:
                    if (json.loads(resp.read()).get("canary") or {}).get("ready"):
                        break
            except OSError:
                pass
            time.sleep(0.5)
        counts: dict = {}
        workers = [threading.Thread(target=clients, args=(url, stop, counts)) for _ in range(2)]
        for w in workers:
            w.start()
        time.sleep(args.seconds)
        stop.set()
        for w in workers:
            w.join()
        with urllib.request.urlopen(f"{url}/canary", timeout=10) as resp:
            decisions = [d for d in json.loads(resp.read())["decisions"] if d["decision"] != "hold"]
        print(f"requests by status: {counts}; decisions: {decisions}")
        time.sleep(10)  # the last scrape
        query = {
            "g0.range_input": f"{int(args.seconds // 60) + 2}m",
            "g1.range_input": f"{int(args.seconds // 60) + 2}m",
        }
        for i, expr in enumerate(GRAPHS):
            query.update({f"g{i}.expr": expr, f"g{i}.tab": "0"})
        page = f"http://127.0.0.1:{state['prometheus_port']}/classic/graph?" + urllib.parse.urlencode(query)
        subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1400,1500",
             "--virtual-time-budget=15000", f"--screenshot={args.out}", page],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        print(f"saved {args.out}")
    finally:
        stop.set()
        if serve is not None and serve.poll() is None:
            serve.send_signal(signal.SIGINT)
            serve.wait(timeout=60)
        services.down(s.root)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
