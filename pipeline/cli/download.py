"""`kiln download`: Hugging Face models into kiln's model cache, to start a profile from
(`model.from_pretrained`); `--list` and `--info` read the cache."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.cli.command import Command
from pipeline.errors import KilnError


class Download(Command):
    help = "download Hugging Face models into the model cache (--list: what is there; --info ID: one model)"
    description = (
        "Download MODEL_ID (safetensors weights, configs, tokenizer, model card) into the model cache, "
        "$KILN_MODEL_CACHE or data/work/model_cache, in huggingface_hub's layout; a profile then starts from it "
        "with `model: {from_pretrained: MODEL_ID}`. A download goes to a staging folder and enters the cache "
        "only when complete. Gated models need HF_TOKEN (or `hf auth login`). With HF_HUB_OFFLINE=1 nothing "
        "is fetched: a model not in the cache is an error."
    )
    online = True  # the one command that may reach the hub (unless HF_HUB_OFFLINE=1 is set)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("model", nargs="?", metavar="MODEL_ID", help="a hub id such as HuggingFaceTB/SmolLM-135M")
        parser.add_argument("--revision", help="branch, tag or commit (default: main)")
        parser.add_argument(
            "--config", metavar="FILE", help="a YAML file: `models:` a list of ids or {id, revision}; downloads each"
        )
        parser.add_argument("--list", action="store_true", help="list the cached models with revisions and sizes")
        parser.add_argument("--info", metavar="MODEL_ID", help="architecture, parameters, tokenizer, license, files")
        parser.add_argument(
            "--cache", metavar="DIR", help="the model cache (default: $KILN_MODEL_CACHE, else work folder/model_cache)"
        )
        parser.add_argument("--json", action="store_true", help="--list and --info as JSON")

    def run(self, args: argparse.Namespace) -> int:
        from pipeline.layout import model_cache_dir
        from pipeline.train import hub

        cache = Path(args.cache) if args.cache else model_cache_dir()
        chosen = [bool(args.model), bool(args.config), args.list, bool(args.info)]
        if sum(chosen) != 1:
            raise KilnError("give one of MODEL_ID, --config FILE, --list or --info MODEL_ID (see kiln download --help)")
        if args.list:
            rows = hub.list_cached(cache)
            print(json.dumps(rows, indent=2) if args.json else list_table(rows, cache))
            return 0
        if args.info:
            info = hub.describe(args.info, args.revision, cache)
            print(json.dumps(info, indent=2) if args.json else info_text(info))
            return 0
        wanted = hub.read_model_list(Path(args.config)) if args.config else [(args.model, args.revision)]
        failed = []
        for repo_id, revision in wanted:
            try:
                hub.download(repo_id, revision, cache, say=lambda line: print(line, file=sys.stderr))
            except KilnError as exc:
                if len(wanted) == 1:
                    raise
                print(f"kiln: error: {exc}", file=sys.stderr)  # the others still download
                failed.append(repo_id)
        if failed:
            raise KilnError(f"{len(failed)} of {len(wanted)} models did not download: {', '.join(failed)}")
        return 0


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def list_table(rows: list[dict], cache: Path) -> str:
    if not rows:
        return f"no models in {cache} (kiln download MODEL_ID)"
    lines = [f"{'model':<40} {'revision':<12} {'refs':<12} {'files':>5} {'size':>10}  state"]
    for r in rows:
        refs, size = ",".join(r["refs"]) or "-", _size(r["bytes"])
        lines.append(f"{r['model']:<40} {r['revision'][:12]:<12} {refs:<12} {r['files']:>5} {size:>10}  {r['state']}")
    total = sum(r["bytes"] for r in rows)
    lines.append(f"{len(rows)} revisions, {_size(total)} in {cache}")
    return "\n".join(lines)


def info_text(info: dict) -> str:
    c, t = info["config"], info["tokenizer"]
    shape = ", ".join(f"{k} {v}" for k, v in c.items())
    tokenizer = ", ".join(f"{k} {v}" for k, v in t.items() if k != "kind")
    files = "\n".join(f"  {_size(n):>10}  {name}" for name, n in info["files"].items())
    return (
        f"{info['model']}  ({info['path']})\n"
        f"architecture: {info['architecture']} (model_type {info['model_type']})\n"
        f"parameters:   {info['parameters']:,}\n"
        f"shape:        {shape}\n"
        f"tokenizer:    {t['kind']}; {tokenizer}\n"
        f"license:      {info['license'] or 'not stated in the model card'}\n"
        f"files:\n{files}"
    )
