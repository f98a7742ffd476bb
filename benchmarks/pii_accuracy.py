"""PII masking recall and precision on a labelled set, per kind, against a reference masker.

    python benchmarks/pii_accuracy.py [data/pii_labelled.jsonl]

The labelled set (data/pii_labelled.jsonl) holds English, Korean and code lines: each row's
`pii` lists the (kind, exact text) pairs a masker should find; look-alike rows list none.
The reference is datatrove's own PIIFormatter patterns (e-mail and IP only, no validation),
run on the same rows, so the ratio says what kiln's validators buy on those two kinds.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from pipeline.data.pii import find_pii

ROOT = Path(__file__).resolve().parent.parent


def score(rows: list[dict], finder) -> dict:
    tp, fp, fn = Counter(), Counter(), Counter()
    for row in rows:
        gold = Counter((k, v) for k, v in row["pii"])
        found = Counter(finder(row["text"]))
        for kind, _ in (gold & found).elements():
            tp[kind] += 1
        for kind, _ in (found - gold).elements():
            fp[kind] += 1
        for kind, _ in (gold - found).elements():
            fn[kind] += 1
    kinds = sorted(set(tp) | set(fp) | set(fn))
    table = {}
    for kind in kinds + ["all"]:
        t = sum(tp.values()) if kind == "all" else tp[kind]
        p = sum(fp.values()) if kind == "all" else fp[kind]
        n = sum(fn.values()) if kind == "all" else fn[kind]
        table[kind] = {
            "recall": t / (t + n) if t + n else 1.0,
            "precision": t / (t + p) if t + p else 1.0,
            "tp": t,
            "fp": p,
            "fn": n,
        }
    return table


def datatrove_reference(text: str) -> list[tuple[str, str]]:
    from datatrove.pipeline.formatters.pii import PIIFormatter

    formatter = PIIFormatter()
    found = []
    for replacer, kind in ((formatter.emails_replacer, "email"), (formatter.ip_replacer, "ip")):
        found += [(kind, m.group(0)) for m in replacer.regex.finditer(text)]
    return found


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "data" / "pii_labelled.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    ours = score(rows, find_pii)
    spans, clean_rows = sum(len(r["pii"]) for r in rows), sum(not r["pii"] for r in rows)
    print(f"PII on {len(rows)} labelled rows ({spans} spans, {clean_rows} look-alike rows)")
    print(f"{'kind':<14}{'recall':>8}{'precision':>11}{'tp':>5}{'fp':>5}{'fn':>5}")
    for kind, s in ours.items():
        print(f"{kind:<14}{s['recall']:>8.3f}{s['precision']:>11.3f}{s['tp']:>5}{s['fp']:>5}{s['fn']:>5}")
    try:
        ref = score([{**r, "pii": [p for p in r["pii"] if p[0] in ("email", "ip")]} for r in rows], datatrove_reference)
    except (ImportError, AttributeError) as exc:
        print(f"reference masker unavailable: {exc}")
        return
    ours_ei = score([{**r, "pii": [p for p in r["pii"] if p[0] in ("email", "ip")]} for r in rows],
                    lambda t: [f for f in find_pii(t) if f[0] in ("email", "ip")])["all"]  # fmt: skip
    print(
        f"email+ip vs datatrove PIIFormatter: precision {ours_ei['precision']:.3f} vs {ref['all']['precision']:.3f} "
        f"(ratio {ours_ei['precision'] / max(ref['all']['precision'], 1e-9):.2f}), "
        f"recall {ours_ei['recall']:.3f} vs {ref['all']['recall']:.3f}"
    )


if __name__ == "__main__":
    main()
