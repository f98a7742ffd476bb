"""The shape of kiln's code: modules, the longest files and functions, and the function length
distribution (median, 90th percentile), read with `ast` from pipeline/, assets/, resources/ and
definitions.py. What a new maintainer meets; the style asks for files under ~600 lines.

    python benchmarks/code_shape.py [--top 10]
"""

from __future__ import annotations

import argparse
import ast
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sources() -> list[Path]:
    files = [*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("assets/*.py"), *ROOT.glob("resources/*.py")]
    return sorted([*files, ROOT / "definitions.py"])


def functions(path: Path) -> list[tuple[int, str]]:
    """(lines, qualified name) of every function and method, decorators included."""
    found = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                start = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                found.append((child.end_lineno - start + 1, f"{prefix}{child.name}"))
                walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.")

    walk(ast.parse(path.read_text(encoding="utf-8")), "")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top", type=int, default=10, help="how many of the longest files and functions to list")
    args = parser.parse_args()
    files = sources()
    lines = {f: len(f.read_text(encoding="utf-8").splitlines()) for f in files}
    funcs = [(n, f"{f.relative_to(ROOT)}:{name}") for f in files for n, name in functions(f)]
    lengths = sorted(n for n, _ in funcs)
    p90 = lengths[int(0.9 * (len(lengths) - 1))]
    print(f"{len(files)} modules, {sum(lines.values())} lines; {len(funcs)} functions: median "
          f"{statistics.median(lengths):.1f} lines, 90th percentile {p90}, over 60 lines: "
          f"{sum(n > 60 for n in lengths)}; files over 600 lines: {sum(n > 600 for n in lines.values())}")  # fmt: skip
    print("\n| longest files | lines |\n|---|---:|")
    for f, n in sorted(lines.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"| {f.relative_to(ROOT)} | {n} |")
    print("\n| longest functions | lines |\n|---|---:|")
    for n, name in sorted(funcs, reverse=True)[: args.top]:
        print(f"| {name} | {n} |")


if __name__ == "__main__":
    main()
