"""PII masking recall and precision on a labelled set, per kind, against a reference masker.

    python benchmarks/pii_accuracy.py [data/pii_labelled.jsonl]

The labelled set (data/pii_labelled.jsonl) holds English, Korean and code lines: each row's
`pii` lists the (kind, exact text) pairs a masker should find; look-alike rows list none. Each
finder is also scored on the rows written in Korean alone.
The reference is datatrove's own PIIFormatter patterns (e-mail and IP only, no validation),
run on the same rows, so the ratio says what kiln's validators buy on those two kinds. The
second detector (the clean-corpus check's own scanner) and the masker before the fixes for
Korean particles and number forms (read from git history) are scored on the same rows.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from pipeline.data.pii import find_pii
from pipeline.data.pii_scan import scan_pii

ROOT = Path(__file__).resolve().parent.parent
PREVIOUS_COMMIT = "7f45ef8"  # before the Korean-boundary and number-form fixes


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


def _masker_at(commit: str):
    """find_pii as it was at `commit`, read from git history (None outside a checkout)."""
    import subprocess
    import types

    done = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{commit}:pipeline/data/pii.py"], capture_output=True, text=True
    )
    if done.returncode != 0:
        return None
    module = types.ModuleType("previous_pii")
    sys.modules["previous_pii"] = module  # dataclasses look their module up by name
    exec(compile(done.stdout, "previous_pii.py", "exec"), module.__dict__)
    return module.find_pii


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "data" / "pii_labelled.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    spans, clean_rows = sum(len(r["pii"]) for r in rows), sum(not r["pii"] for r in rows)
    korean = [r for r in rows if any("\uac00" <= c <= "\ud7a3" for c in r["text"])]
    print(f"PII on {len(rows)} labelled rows ({spans} spans, {clean_rows} look-alike rows; {len(korean)} in Korean)")
    finders = {"masker (pii.find_pii)": find_pii, "second detector (pii_scan.scan_pii)": scan_pii}
    previous = _masker_at(PREVIOUS_COMMIT)
    if previous is not None:
        finders[f"previous masker ({PREVIOUS_COMMIT})"] = previous
    for name, finder in finders.items():
        print(f"\n{name}\n{'kind':<14}{'recall':>8}{'precision':>11}{'tp':>5}{'fp':>5}{'fn':>5}")
        for kind, s in score(rows, finder).items():
            print(f"{kind:<14}{s['recall']:>8.3f}{s['precision']:>11.3f}{s['tp']:>5}{s['fp']:>5}{s['fn']:>5}")
        s = score(korean, finder)["all"]
        print(f"{'Korean rows':<14}{s['recall']:>8.3f}{s['precision']:>11.3f}{s['tp']:>5}{s['fp']:>5}{s['fn']:>5}")
    print()
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
