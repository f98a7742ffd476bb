"""`kiln canary status|analyze|promote|abort`: the canary of a running `kiln serve`, judged on its live traffic.

The counters live in the gateway, so each action asks it over HTTP (`--url`, default
http://127.0.0.1:8000): `status` and `analyze` with an API key when the gateway has keys
($KILN_API_KEY or --api-key), `promote` and `abort` with an admin key ($KILN_ADMIN_KEY or --admin-key).
The analysis and its thresholds: docs/SERVING.md ("Canary analysis").
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.parse
import urllib.request

from pipeline.cli.command import Command, Group
from pipeline.errors import KilnError


def _request(url: str, path: str, key: str | None, method: str = "GET") -> dict:
    """One call to the gateway; an unreachable gateway or a refusal is one clear line."""
    req = urllib.request.Request(url.rstrip("/") + path, method=method, data=b"" if method == "POST" else None)
    if key:
        req.add_header("X-API-Key", key)
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail")
        except ValueError:
            detail = exc.reason
        raise KilnError(f"{url}{path} answered {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise KilnError(f"kiln serve is not reachable at {url} ({reason})") from None


class CanaryAction(Command):
    admin = False

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway (default: %(default)s)")
        env = "KILN_ADMIN_KEY" if self.admin else "KILN_API_KEY"
        parser.add_argument(
            "--admin-key" if self.admin else "--api-key", dest="key", default=os.environ.get(env),
            help=f"the gateway's {'admin ' if self.admin else ''}key (default: ${env})",
        )  # fmt: skip
        parser.add_argument("--json", action="store_true", help="print the gateway's answer as JSON")


def analysis_table(a: dict) -> str:
    c, p = a["canary"], a["production"]
    lines = [f"canary {c['version']} against production {p['version']}: {a['decision'].upper()} ({a['reason']})", ""]
    figures = [k for k in c if k != "version"]
    lines.append(f"{'figure':<20} {'production':>12} {'canary':>12}")
    lines += [f"{k:<20} {_cell(p[k]):>12} {_cell(c[k]):>12}" for k in figures]
    if a["checks"]:
        lines += ["", f"{'check':<18} {'verdict':<10} {'llr':>7}  threshold"]
        lines += [f"{x['name']:<18} {x['verdict']:<10} {x['llr']:>7.2f}  {x['threshold'] or '-'}" for x in a["checks"]]
    return "\n".join(lines)


def _cell(v) -> str:
    return "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


class Status(CanaryAction):
    help = "the canary and production versions, the canary's share, requests counted, the last decisions"

    def run(self, args: argparse.Namespace) -> int:
        s = _request(args.url, "/canary", args.key)
        if args.json:
            print(json.dumps(s, indent=2))
            return 0
        c = s["canary"]
        prod = (s["production"] or {}).get("version", "-")
        canary = "none" if c is None else f"{c['version']} at share {c['share']:g}"
        auto = "on" if s["auto"] else "off"
        print(f"production {prod}; canary {canary}; auto {auto}; at least {s['min_requests']} requests per version")
        for version, n in sorted(s["requests"].items()):
            print(f"  version {version}: {n} requests counted")
        for d in s["decisions"][-5:]:
            print(f"  {d['decision']:<8} canary {d['canary']} ({d['by']}): {d['reason']}")
        return 0


class Analyze(CanaryAction):
    help = "the canary analysis now: every figure of both versions, each check's verdict, the decision (nothing done)"

    def run(self, args: argparse.Namespace) -> int:
        a = _request(args.url, "/canary/analysis", args.key)
        print(json.dumps(a, indent=2) if args.json else analysis_table(a))
        return 0


class Promote(CanaryAction):
    help = "promote the canary now: production moves in the registry with the analysis attached"
    admin = True

    def run(self, args: argparse.Namespace) -> int:
        e = _request(args.url, "/admin/canary/promote", args.key, "POST")
        done = f"canary {e['canary']} promoted (production was {e['production']})"
        print(json.dumps(e, indent=2) if args.json else done)
        return 0


class Abort(CanaryAction):
    help = "abort the canary now: its share to 0, its version tagged canary_failed with the reason"
    admin = True

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("--reason", default="aborted by hand", help="why (tagged on the version)")

    def run(self, args: argparse.Namespace) -> int:
        path = "/admin/canary/abort?" + urllib.parse.urlencode({"reason": args.reason})
        e = _request(args.url, path, args.key, "POST")
        print(json.dumps(e, indent=2) if args.json else f"canary {e['canary']} aborted: {e['reason']}")
        return 0


class Canary(Group):
    help = "the canary of a running kiln serve: status, analyze, promote, abort"
    description = (
        "Judge the canary beside production on live traffic (error rate, timeouts, TTFT and latency P95, "
        "tokens/s, answer length, empty and repetitive answers, thumbs-down share) with sequential tests; "
        "`kiln serve --canary-auto` does the same on its own."
    )
    actions = {"status": Status(), "analyze": Analyze(), "promote": Promote(), "abort": Abort()}
