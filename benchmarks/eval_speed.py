"""eval_report's costs that changed, each against the way it ran before, in this one process.

    python benchmarks/eval_speed.py [--profile tiny] [--model PATH] [--problems 20] [--rounds 2]

- lm-eval's task index for the profile's standard tasks (`eval.lm_eval_tasks`): every one of
  lm-eval's YAML files (the reference) against only the folders whose YAML names the tasks;
  both must give the same verdict per task (offline: unavailable, for the same reason).
- HumanEval on two runs of the HF checkpoint (`--model`, default the profile's dpo_model), as
  eval_report does for base/SFT/DPO: generate then score each in turn (the reference) against
  scoring one run's completions in the sandbox while the next run generates. Greedy, the
  profile's token budget (or `--max-new-tokens`); the results must be identical.

Each reports seconds (median over rounds) and the ratio to its reference (below 1: faster).
Needs the model: `make run` makes it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.config import load_profile
from pipeline.eval.evaluation import _folders_naming, loadable, task_manager
from pipeline.eval.humaneval import generate, score, task_ids
from pipeline.layout import Layout


def _median_seconds(fn, rounds: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--model", type=Path, help="an HF checkpoint folder (default: the profile's dpo_model)")
    ap.add_argument("--problems", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, help="default: the profile's eval.max_new_tokens")
    args = ap.parse_args()
    profile = load_profile(args.profile)
    s = profile.eval
    model = args.model or Layout.for_profile(profile.name).model_dir("dpo")
    if not (model / "config.json").is_file():
        print(f"benchmark: {model} missing: run `make run PROFILE={args.profile}` first", file=sys.stderr)
        return 2
    ok = True
    import lm_eval.tasks  # noqa: F401  imported before timing: both ways need it

    with tempfile.TemporaryDirectory() as tmp:
        names = s.lm_eval_tasks or ["arc_easy"]
        full, verdict_full = _median_seconds(lambda: loadable(task_manager(Path(tmp), names), names), 1)
        narrow, verdict_narrow = _median_seconds(
            lambda: loadable(task_manager(Path(tmp), names, _folders_naming(names)), names), args.rounds
        )
    same_verdict = verdict_full == verdict_narrow
    ok &= same_verdict
    print(f"lm-eval task index for {', '.join(names)}:")
    print(f"  every folder (reference)   {full:7.2f} s")
    print(f"  folders naming the tasks   {narrow:7.2f} s   x{narrow / full:.2f}   same verdict: {same_verdict}")

    ids, budget = task_ids(args.problems), args.max_new_tokens or s.max_new_tokens
    generate(model, ids[:1], max_new_tokens=2, progress=False)  # warm-up: first-call costs timed in neither

    def run() -> list[dict]:
        return generate(model, ids, max_new_tokens=budget, batch_size=s.batch_size, progress=False)

    def one_after_another() -> list:
        return [score(run(), s.pass_k, s.timeout, unsafe=s.unsafe_sandbox)[1] for _ in range(2)]

    def overlapped() -> list:
        with ThreadPoolExecutor(max_workers=1) as scorer:
            pending = [scorer.submit(score, run(), s.pass_k, s.timeout, unsafe=s.unsafe_sandbox) for _ in range(2)]
        return [p.result()[1] for p in pending]

    ref, ref_rows = _median_seconds(one_after_another, args.rounds)
    new, new_rows = _median_seconds(overlapped, args.rounds)
    same = ref_rows == new_rows
    ok &= same
    print(f"HumanEval, 2 runs x {len(ids)} problems, greedy, at most {budget} new tokens, {model}:")
    print(f"  generate, score, generate, score (reference)   {ref:7.2f} s")
    print(f"  scoring beside the next generation             {new:7.2f} s   x{new / ref:.2f}   identical: {same}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
