"""HumanEval generation speed: kiln's batched HF generation against the plain one-prompt-at-a-time
loop with transformers' `stop_strings`, and llama.cpp on the Q4_K_M GGUF beside them.

    python benchmarks/humaneval_generation.py [--profile tiny] [--problems 16] [--rounds 2]

Needs the profile's dpo_model and gguf_model (`make run` makes them). Every method decodes
greedily the first `--problems` prompts with the same stop sequences and token budget, in this
one process, in alternating rounds; each reports problems/s (median over rounds). The
reference is what a first script writes: `model.generate(..., stop_strings=STOP_SEQUENCES,
tokenizer=tok)` per prompt (sent without its trailing newline and spliced back, as kiln does).
The completions of kiln and the reference must be identical.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.config import load_profile
from pipeline.eval.humaneval import STOP_SEQUENCES, generate, model_prompt, problems, splice, task_ids, truncate

ROOT = Path(__file__).resolve().parent.parent


def reference(checkpoint: Path, ids: list[str], max_new_tokens: int) -> list[dict]:
    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    table, rows = problems(), []
    for task_id in ids:
        prompt = table[task_id]["prompt"]
        x = torch.tensor([[tok.eos_token_id, *tok(model_prompt(prompt), add_special_tokens=False)["input_ids"]]])
        with torch.no_grad():
            out = model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, stop_strings=STOP_SEQUENCES,
                tokenizer=tok,
            )  # fmt: skip
        text = truncate(tok.decode(out[0, x.shape[1] :], skip_special_tokens=True))
        rows.append({"task_id": task_id, "completion": splice(prompt, text)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--problems", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    profile = load_profile(args.profile)
    work = ROOT / "data" / "work" / profile.name
    checkpoint, gguf = work / "dpo_model" / "model", work / "gguf_model" / f"kiln-{profile.name}-Q4_K_M.gguf"
    if not checkpoint.exists() or not gguf.exists():
        print(
            f"benchmark: {checkpoint} or {gguf} missing: run `make run PROFILE={args.profile}` first", file=sys.stderr
        )
        return 2
    ids, budget = task_ids(args.problems), profile.eval.max_new_tokens
    methods = {
        "reference (one prompt, stop_strings)": lambda: reference(checkpoint, ids, budget),
        "kiln HF (batch 8)": lambda: generate(checkpoint, ids, max_new_tokens=budget, batch_size=8, progress=False),
        "kiln llama.cpp Q4_K_M": lambda: generate(gguf, ids, max_new_tokens=budget, progress=False),
    }
    rates: dict[str, list[float]] = {m: [] for m in methods}
    outputs = {}
    for _ in range(args.rounds):
        for name, run in methods.items():
            start = time.perf_counter()
            outputs[name] = run()
            rates[name].append(len(ids) / (time.perf_counter() - start))
    ref_name, kiln_name = list(methods)[:2]
    same = outputs[ref_name] == outputs[kiln_name]
    ref = statistics.median(rates[ref_name])
    print(f"{len(ids)} HumanEval problems, greedy, at most {budget} new tokens, {torch.get_num_threads()} threads")
    for name, r in rates.items():
        print(f"  {name:40s} {statistics.median(r):6.2f} problems/s   x{statistics.median(r) / ref:.2f}")
    print(f"kiln HF completions identical to the reference's: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
