"""`kiln serve`: pull the version, start the gateway and its llama-server replicas, serve until Ctrl-C.
`kiln replica`: one llama-server on another machine, for a gateway's `--replica-url`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.cli.command import Command, add_profile
from pipeline.errors import KilnError


class Serve(Command):
    help = "serve a registered GGUF version over HTTP from a pool of llama-server replicas"
    description = (
        "Resolve the alias (or version) in the registry, pull and verify its GGUF, start and warm the "
        "replicas, and answer REST, SSE and OpenAI-compatible requests. Settings come from the environment "
        "or $KILN_SERVE_CONFIG (see README); the options below override them."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_profile(parser, help="whose registered model: kiln-<profile> (default: $KILN_PROFILE or tiny)")
        which = parser.add_mutually_exclusive_group()
        which.add_argument("--alias", default=None, help="the alias to serve and follow (default: production)")
        which.add_argument("--version", default=None, help="a fixed version number")
        which.add_argument("--gguf", default=None, metavar="FILE", help="a local GGUF file instead of the registry")
        parser.add_argument(
            "--replicas", type=int, default=None, help="local llama-server processes (default: 2; 0 with --replica-url)"
        )
        parser.add_argument(
            "--replica-url", action="append", default=None, metavar="URL",
            help="a llama-server `kiln replica` runs on another host (repeatable; or $KILN_REPLICA_URLS); "
            "its key in $KILN_REPLICA_KEY",
        )  # fmt: skip
        parser.add_argument("--host", default=None, help="address to listen on (default: 127.0.0.1)")
        parser.add_argument("--port", type=int, default=None, help="port (default: $PORT or 8000)")
        parser.add_argument("--quant", default=None, help="which GGUF of the version (default: Q4_K_M)")
        parser.add_argument("--canary", default=None, metavar="ALIAS", help="also serve this alias or version")
        parser.add_argument("--canary-share", type=float, default=0.1, help="share of requests for the canary")
        parser.add_argument(
            "--canary-auto", action="store_true", default=None,
            help="decide the canary by analysis of live traffic: promote it (production moves in the registry), "
            "hold, or abort it (share 0, tagged canary_failed); thresholds: KILN_CANARY_* settings",
        )  # fmt: skip
        parser.add_argument(
            "--tracking-uri", default=None, help="MLflow URI (default: $MLFLOW_TRACKING_URI or registry/)"
        )

    def run(self, args: argparse.Namespace) -> int:
        from pipeline.config import load_profile
        from pipeline.serve.server import file_target, registry_canary_actions, registry_target, run_server
        from pipeline.serve.settings import load_settings
        from pipeline.tracking import default_tracking_uri

        if args.replicas is not None and args.replicas < 0:
            raise KilnError(f"--replicas {args.replicas}: 0 or more")
        if not 0 <= args.canary_share <= 1:
            raise KilnError(f"--canary-share {args.canary_share}: a share between 0 and 1")
        settings = load_settings(
            host=args.host, port=args.port, kiln_replicas=args.replicas, kiln_quant=args.quant,
            kiln_canary_auto=args.canary_auto, kiln_replica_urls=",".join(args.replica_url or []) or None,
        )  # fmt: skip
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        if args.gguf:
            if args.canary:
                raise KilnError("--canary needs the registry; it cannot go with --gguf")
            target, canary, actions = (
                file_target(Path(args.gguf), args.tracking_uri or default_tracking_uri()),
                None,
                None,
            )
        else:
            uri, profile = args.tracking_uri or default_tracking_uri(), load_profile(args.profile).name
            which = args.version or args.alias or "production"
            target = registry_target(uri, profile, which, settings.kiln_quant)
            canary = registry_target(uri, profile, args.canary, settings.kiln_quant) if args.canary else None
            actions = registry_canary_actions(uri, profile)
        if settings.kiln_canary_auto and canary is None:
            raise KilnError("--canary-auto needs a canary to decide on: --canary ALIAS")
        run_server(settings, target, canary, args.canary_share if canary else 0.0, actions)
        return 0


class ReplicaHostCommand(Command):
    help = "run one llama-server of a registered version for a gateway on another host (kiln serve --replica-url)"
    description = (
        "Pull and verify the version the alias names (as kiln serve does), run llama-server on HOST:PORT with "
        "the key $KILN_REPLICA_KEY (one is made and printed when it is unset), and answer the gateway on "
        'PORT+1: GET /status, and POST /load {"version": N} when the gateway hot-swaps. Slots, threads and '
        "warm-up come from the KILN_* serve settings. Exits 1 if llama-server dies."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_profile(parser, help="whose registered model: kiln-<profile> (default: $KILN_PROFILE or tiny)")
        which = parser.add_mutually_exclusive_group()
        which.add_argument("--alias", default=None, help="the alias to load at start (default: production)")
        which.add_argument("--version", default=None, help="a version number to load at start")
        parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
        parser.add_argument("--port", type=int, default=8080, help="llama-server's port; control on the next one")
        parser.add_argument("--quant", default=None, help="which GGUF of the version (default: Q4_K_M)")
        parser.add_argument("--tracking-uri", default=None, help="MLflow URI (default: $MLFLOW_TRACKING_URI)")

    def run(self, args: argparse.Namespace) -> int:
        import asyncio
        import os
        import secrets
        import signal

        from pipeline.config import load_profile
        from pipeline.serve import engine, source
        from pipeline.serve.remote import ReplicaHost
        from pipeline.serve.settings import load_settings
        from pipeline.tracking import default_tracking_uri

        if not 0 < args.port < 65535:
            raise KilnError(f"--port {args.port}: 1 to 65534 (the control port is the next one)")
        settings = load_settings(kiln_quant=args.quant)
        uri, profile = args.tracking_uri or default_tracking_uri(), load_profile(args.profile).name
        key = os.environ.get("KILN_REPLICA_KEY") or secrets.token_urlsafe(24)
        try:
            binary = engine.locate()
        except engine.EngineUnavailable as exc:
            raise KilnError(str(exc)) from None
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        host = ReplicaHost(
            binary, lambda which: source.pull(uri, profile, which, settings.kiln_quant), settings, args.host, args.port,
            key,
        )  # fmt: skip

        def announce(h: ReplicaHost) -> None:
            shown = "" if os.environ.get("KILN_REPLICA_KEY") else f" key {key}"
            print(
                f"kiln replica: {h.replica.source.label} on {h.replica.url} (control :{h.port + 1}){shown}", flush=True
            )

        async def until_stopped() -> int:
            # SIGTERM (systemd, Kubernetes, kill) and Ctrl-C end `serve`, whose cleanup stops llama-server
            serving = asyncio.ensure_future(host.serve(args.version or args.alias or "production", announce))
            for sig in (signal.SIGTERM, signal.SIGINT):
                asyncio.get_running_loop().add_signal_handler(sig, serving.cancel)
            try:
                return await serving
            except asyncio.CancelledError:
                return 0

        return asyncio.run(until_stopped())
