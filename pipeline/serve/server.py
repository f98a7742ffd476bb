"""Assembling a server: what to serve (a registry alias or version, or a file), the app, uvicorn.

`pipeline/cli/serve.py` is the `kiln serve` command on top of this; tests and the benchmark build
the same app with `build`.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import KilnError


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
    )


def file_target(path: Path):
    from pipeline.serve import source
    from pipeline.serve.rollout import Target

    return Target("local", fetch=lambda _: source.from_file(path))


def build(settings, target, canary=None, canary_share: float = 0.0, on_startup_failure=None):
    """The FastAPI app and its deployment; the replicas start when the app starts (its lifespan)."""
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
    return create_app(settings, deployment, metrics, on_startup_failure), deployment


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


def run_server(settings, target, canary=None, canary_share: float = 0.0) -> None:
    """Serve until Ctrl-C (uvicorn on uvloop and httptools, no access log: the gateway writes its own;
    uvicorn's own lines go through kiln's logging set-up, pipeline/logs.py)."""
    import uvicorn

    server: uvicorn.Server | None = None

    def stop() -> None:
        if server is not None:
            server.should_exit = True

    app, deployment = build(settings, target, canary, canary_share, stop)
    server = uvicorn.Server(uvicorn_config(app, settings))
    print(f"kiln serve: {deployment.initial.label} on http://{settings.host}:{settings.port}", flush=True)
    server.run()
    if deployment.active is None and deployment.error:
        raise KilnError(f"serving failed: {deployment.error}")
