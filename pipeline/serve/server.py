"""Assembling a server: what to serve (a registry alias or version, or a file), the app, uvicorn.

`pipeline/cli/serve.py` is the `kiln serve` command on top of this; tests and the benchmark build
the same app with `build`.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from pipeline.errors import KilnError
from pipeline.io import atomic_path
from pipeline.layout import prometheus_targets_from_env


def registry_target(uri: str, profile: str, which: str, quant: str):
    """A Target that follows `which` (an alias or a version number) in the registry."""
    from pipeline.release import registry
    from pipeline.serve import source
    from pipeline.serve.rollout import Target

    return Target(
        which,
        fetch=lambda w: source.pull(uri, profile, w, quant),
        resolve=None if which.isdigit() else (lambda w: source.resolve(uri, profile, w)),
        catalog=lambda: registry.list_versions(uri, profile),
        tracking_uri=uri,
    )


def registry_canary_actions(uri: str, profile: str):
    """What a canary decision does in the registry at `uri` (pipeline/release/canary.py)."""
    from pipeline.release import canary
    from pipeline.serve.canary import CanaryActions

    return CanaryActions(
        promote=lambda version, analysis: canary.record_promotion(uri, profile, version, analysis),
        abort=lambda version, analysis, reason: canary.record_abort(uri, profile, version, analysis, reason),
    )


def file_target(path: Path, tracking_uri: str | None = None):
    """A fixed GGUF file; its answers are traced into `tracking_uri` when one is given."""
    from pipeline.serve import source
    from pipeline.serve.rollout import Target

    return Target("local", fetch=lambda _: source.from_file(path), tracking_uri=tracking_uri)


def build(settings, target, canary=None, canary_share: float = 0.0, on_startup_failure=None, canary_actions=None):
    """The FastAPI app and its deployment; the replicas start when the app starts (its lifespan).
    `canary_actions` (`registry_canary_actions`): what a canary decision does in the registry."""
    from pipeline.serve import engine
    from pipeline.serve.app import create_app
    from pipeline.serve.metrics import Metrics
    from pipeline.serve.rollout import Deployment

    initial = target.fetch(target.which)  # a bad alias or a tampered file stops here, before listening
    try:
        binary = engine.locate()
    except engine.EngineUnavailable as exc:
        raise KilnError(str(exc)) from None
    metrics = Metrics()
    deployment = Deployment(binary, settings, metrics, target, canary, canary_share, initial=initial)
    return create_app(settings, deployment, metrics, on_startup_failure, canary_actions), deployment


def uvicorn_config(app, settings, **overrides):
    """uvicorn's settings for the gateway. uvicorn's own proxy-header handling is off: it would trust
    X-Forwarded-For from loopback; the gateway's edge trusts only KILN_TRUSTED_PROXIES."""
    import uvicorn

    options = {
        "host": settings.host, "port": settings.port, "loop": "uvloop", "http": "httptools", "access_log": False,
        "log_level": "warning", "log_config": None, "proxy_headers": False,
        "timeout_graceful_shutdown": int(settings.kiln_drain_sec) or None, **overrides,
    }  # fmt: skip
    return uvicorn.Config(app, **options)


def run_server(settings, target, canary=None, canary_share: float = 0.0, canary_actions=None) -> None:
    """Serve until Ctrl-C (uvicorn on uvloop and httptools, no access log: the gateway writes its own;
    uvicorn's own lines go through kiln's logging set-up, pipeline/logs.py)."""
    import uvicorn

    server: uvicorn.Server | None = None

    def stop() -> None:
        if server is not None:
            server.should_exit = True

    app, deployment = build(settings, target, canary, canary_share, stop, canary_actions)
    server = uvicorn.Server(uvicorn_config(app, settings))
    print(f"kiln serve: {deployment.initial.label} on http://{settings.host}:{settings.port}", flush=True)
    with announced(settings):
        server.run()
    if deployment.active is None and deployment.error:
        raise KilnError(f"serving failed: {deployment.error}")


@contextlib.contextmanager
def announced(settings):
    """While serving, a target file in $KILN_PROMETHEUS_TARGETS (set by `make services`) tells its
    Prometheus to scrape this gateway's /metrics; removed when serving stops."""
    folder = prometheus_targets_from_env()
    if folder is None:
        yield
        return
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    path = folder / f"kiln-serve-{settings.port}.json"
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps([{"targets": [f"{host}:{settings.port}"], "labels": {"service": "kiln-serve"}}]))
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
