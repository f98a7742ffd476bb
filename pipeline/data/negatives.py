"""Wrong answers for preference pairs: the real function with one small fault put in.

Each corruption edits the source text at one point (found with `ast`) and leaves every other
character as written, so the rejected answer reads like the chosen one up to the fault:
    flipped_comparison   a < b        -> a >= b  (==/!=, in/not in, is/is not likewise)
    flipped_boolean      x and y      -> x or y
    flipped_arithmetic   a + b        -> a - b
    off_by_one           n = 2        -> n = 3   (integer literals)
    returns_none         return value -> return None
    swapped_arguments    f(a, b)      -> f(b, a)
None of them takes text from another function, so they share no construction with the
evaluation tasks (kiln_body_choice draws its wrong answers from other functions' bodies).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

_COMPARE_FLIPS = {
    ast.Lt: ("<", ">="),
    ast.LtE: ("<=", ">"),
    ast.Gt: (">", "<="),
    ast.GtE: (">=", "<"),
    ast.Eq: ("==", "!="),
    ast.NotEq: ("!=", "=="),
    ast.In: ("in", "not in"),
    ast.NotIn: ("not in", "in"),
    ast.Is: ("is", "is not"),
    ast.IsNot: ("is not", "is"),
}
_BOOL_FLIPS = {ast.And: ("and", "or"), ast.Or: ("or", "and")}
_ARITH_FLIPS = {ast.Add: ("+", "-"), ast.Sub: ("-", "+")}


@dataclass(frozen=True)
class Corruption:
    kind: str
    text: str  # the whole corrupted function


class _Source:
    """Character offsets of ast positions (whose columns count UTF-8 bytes) in one text."""

    def __init__(self, text: str):
        self.text = text
        self.lines = text.splitlines(keepends=True)
        self.starts = [0]
        for line in self.lines:
            self.starts.append(self.starts[-1] + len(line))

    def offset(self, lineno: int, col: int) -> int:
        line = self.lines[lineno - 1]
        return self.starts[lineno - 1] + len(line.encode("utf-8")[:col].decode("utf-8", errors="ignore"))

    def start(self, node: ast.AST) -> int:
        return self.offset(node.lineno, node.col_offset)

    def end(self, node: ast.AST) -> int:
        return self.offset(node.end_lineno, node.end_col_offset)


def _swap_word(gap: str, old: str, new: str) -> str | None:
    """`gap` (the text between two operands) with operator `old` written as `new`, or None when
    the operator is not found there as written (odd spacing, a comment holding the same word)."""
    pattern = r"\s+".join(map(re.escape, old.split()))
    if old[0].isalpha():
        pattern = rf"(?<![\w]){pattern}(?![\w])"
    matches = list(re.finditer(pattern, gap))
    if len(matches) != 1:
        return None
    m = matches[0]
    return gap[: m.start()] + new + gap[m.end() :]


def _edits(src: _Source, fn: ast.FunctionDef | ast.AsyncFunctionDef):
    """(kind, start, end, replacement) for every corruption point in the body after the docstring."""
    for stmt in fn.body[1:]:
        for node in ast.walk(stmt):
            if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _COMPARE_FLIPS:
                old, new = _COMPARE_FLIPS[type(node.ops[0])]
                yield from _gap_edit(src, "flipped_comparison", node.left, node.comparators[0], old, new)
            elif isinstance(node, ast.BoolOp) and type(node.op) in _BOOL_FLIPS:
                old, new = _BOOL_FLIPS[type(node.op)]
                yield from _gap_edit(src, "flipped_boolean", node.values[0], node.values[1], old, new)
            elif isinstance(node, ast.BinOp) and type(node.op) in _ARITH_FLIPS:
                old, new = _ARITH_FLIPS[type(node.op)]
                yield from _gap_edit(src, "flipped_arithmetic", node.left, node.right, old, new)
            elif isinstance(node, ast.Constant) and type(node.value) is int:
                if src.text[src.start(node) : src.end(node)] == str(node.value):
                    yield "off_by_one", src.start(node), src.end(node), str(node.value + 1)
            elif isinstance(node, ast.Return) and node.value is not None:
                if not (isinstance(node.value, ast.Constant) and node.value.value is None):
                    yield "returns_none", src.start(node.value), src.end(node.value), "None"
            elif isinstance(node, ast.Call) and len(node.args) >= 2:
                a, b = node.args[:2]
                if not isinstance(a, ast.Starred) and not isinstance(b, ast.Starred):
                    ta, tb = src.text[src.start(a) : src.end(a)], src.text[src.start(b) : src.end(b)]
                    if ta != tb:
                        gap = src.text[src.end(a) : src.start(b)]
                        yield "swapped_arguments", src.start(a), src.end(b), tb + gap + ta


def _gap_edit(src: _Source, kind: str, left: ast.AST, right: ast.AST, old: str, new: str):
    start, end = src.end(left), src.start(right)
    gap = _swap_word(src.text[start:end], old, new)
    if gap is not None:
        yield kind, start, end, gap


def corruptions(function: str) -> list[Corruption]:
    """Every one-point corruption of `function` (the source of one def) that still parses and
    differs from it, in source order."""
    try:
        tree = ast.parse(function)
    except (SyntaxError, ValueError):
        return []
    fns = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    if not fns:
        return []
    src, found, seen = _Source(function), [], set()
    for kind, start, end, replacement in _edits(src, fns[0]):
        text = function[:start] + replacement + function[end:]
        if text == function or text in seen:
            continue
        try:
            ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        seen.add(text)
        found.append(Corruption(kind, text))
    return found
