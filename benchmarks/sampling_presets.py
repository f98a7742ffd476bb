"""The tuned `code` preset against `greedy` and against llama.cpp's default sampler, on the
held-out slice the study tuned on.

    python benchmarks/sampling_presets.py [--profile tiny] [--seeds 5] [--objective kiln_next_line]

Needs the profile's gguf_model and sampling_preset (`make run` makes them; KILN_WORK_DIR is
honoured). Each sampler completes the same held-out items (the profile's tune.objective and
tune.problems, or --objective/--problems) once per seed, in this one process, in alternating
order; each reports the objective and tokens generated per second as mean ± standard deviation
over the seeds, and as a ratio to greedy. llama.cpp's default sampler is llama-cpp-python's
create_completion defaults (temperature 0.8, top_p 0.95, top_k 40, min_p 0.05, repeat_penalty
1.0); it and greedy get the tuned preset's max_tokens, so only the sampler differs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import replace

from pipeline.config import load_profile
from pipeline.data.clean import read_split
from pipeline.io import read_json
from pipeline.layout import Layout
from pipeline.release.gguf_bench import load
from pipeline.release.tuning import N_CTX, PARAMS, TUNED, TUNED_QUANT, complete_all, heldout_items

LLAMA_CPP_DEFAULT = {"temperature": 0.8, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--objective", help="default: the profile's tune.objective")
    ap.add_argument("--problems", type=int, help="default: the profile's tune.problems")
    args = ap.parse_args()
    profile = load_profile(args.profile)
    s = replace(profile.tune, objective=args.objective or profile.tune.objective)
    s = replace(s, problems=args.problems or s.problems)
    layout = Layout.for_profile(profile.name)
    gguf, presets_file = layout.gguf(TUNED_QUANT), layout.presets_json
    if not gguf.exists() or not presets_file.exists():
        print(f"benchmark: {gguf} or {presets_file} missing: run `make run PROFILE={args.profile}`", file=sys.stderr)
        return 2
    presets = read_json(presets_file)
    code = {k: presets[TUNED][k] for k in PARAMS}
    samplers = {
        TUNED: code,
        "greedy": {**{k: presets["greedy"][k] for k in PARAMS}, "max_tokens": code["max_tokens"]},
        "llama.cpp default": {**LLAMA_CPP_DEFAULT, "max_tokens": code["max_tokens"]},
    }
    validation = list(read_split(layout.clean_splits, "validation")) if s.objective == "kiln_next_line" else []
    items = heldout_items(s.objective, s.problems, validation, profile.eval.timeout, profile.eval.unsafe_sandbox)
    llm = load(gguf, n_ctx=N_CTX, threads=s.threads)
    runs: dict[str, list[dict]] = {name: [] for name in samplers}
    try:
        complete_all(llm, items[:2], code, 0)  # warm-up: first-call allocations out of the figures
        for seed in range(args.seeds):
            order = list(samplers) if seed % 2 == 0 else list(reversed(samplers))
            for name in order:
                runs[name].append(complete_all(llm, items, samplers[name], seed * 1000))
    finally:
        llm.close()
    print(f"{gguf.name}: {s.objective} on {len(items)} held-out items, {args.seeds} seeds, {os.cpu_count()} cores")
    print(f"tuned preset: {code}")
    print("| sampler | objective (mean ± sd) | tokens/s (mean ± sd) | objective − greedy | tokens/s ÷ greedy |")
    print("|---|---:|---:|---:|---:|")
    greedy = _stats(runs["greedy"])
    for name, rows in runs.items():
        st = _stats(rows)
        print(
            f"| {name} | {st['objective'][0]:.3f} ± {st['objective'][1]:.3f} "
            f"| {st['tps'][0]:.0f} ± {st['tps'][1]:.0f} | {st['objective'][0] - greedy['objective'][0]:+.3f} "
            f"| {st['tps'][0] / greedy['tps'][0]:.2f}x |"
        )
    return 0


def _stats(rows: list[dict]) -> dict:
    def ms(xs):
        return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0

    return {"objective": ms([r["objective"] for r in rows]), "tps": ms([r["tokens_per_s"] for r in rows])}


if __name__ == "__main__":
    sys.exit(main())
