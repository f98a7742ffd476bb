"""Plain values across the sandbox wall: None, bool, int, float, str, bytes and lists, tuples,
dicts, sets and frozensets of them, each of exactly that type, encoded as one line of tagged JSON.

A HumanEval test asserts on what the candidate returns; the assertion runs in the scorer on the
decoded copy, so an object from the sandbox (one whose `__eq__` always answers True, an int
subclass) cannot take part. This module is standard library only: the sandboxed runner carries
its source text, so both sides encode and decode with the same code.
"""

import json

MAX_DEPTH = 64


def encode(value, depth=0):
    """A JSON-ready tree of `value`; TypeError for anything that is not exactly a plain type."""
    if depth > MAX_DEPTH:
        raise TypeError("value nested too deeply")
    kind = type(value)
    if value is None:
        return None
    if kind is bool:
        return {"b": value}
    if kind is int:
        return {"i": str(value)}
    if kind is float:
        return {"f": repr(value)}
    if kind is str:
        return {"s": value}
    if kind is bytes:
        return {"y": value.hex()}
    if kind in (list, tuple, set, frozenset):
        tag = {list: "l", tuple: "t", set: "S", frozenset: "F"}[kind]
        return {tag: [encode(v, depth + 1) for v in value]}
    if kind is dict:
        return {"d": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    raise TypeError(f"a {kind.__name__} is not a plain value")


def decode(tree, depth=0):
    """The value `encode` described; ValueError for any tree it could not have written."""
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    if tree is None:
        return None
    if type(tree) is not dict or len(tree) != 1:
        raise ValueError("not an encoded value")
    ((tag, body),) = tree.items()
    if tag == "b" and type(body) is bool:
        return body
    if tag == "i" and type(body) is str:
        return int(body)
    if tag == "f" and type(body) is str:
        return float(body)
    if tag == "s" and type(body) is str:
        return body
    if tag == "y" and type(body) is str:
        return bytes.fromhex(body)
    if tag in ("l", "t", "S", "F") and type(body) is list:
        items = [decode(v, depth + 1) for v in body]
        return {"l": list, "t": tuple, "S": set, "F": frozenset}[tag](items)
    if tag == "d" and type(body) is list and all(type(p) is list and len(p) == 2 for p in body):
        return {decode(k, depth + 1): decode(v, depth + 1) for k, v in body}
    raise ValueError(f"not an encoded value (tag {tag!r})")


def dumps(value) -> bytes:
    return json.dumps(value, ensure_ascii=True).encode() + b"\n"


def loads(line: bytes):
    return json.loads(line.decode("utf-8"))
