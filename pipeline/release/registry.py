"""The MLflow model registry: register GGUF versions, promote, roll back, pull.

A registered model per profile (`kiln-<profile>`). Each version holds the GGUF files, the
merged HF checkpoint, the model card and the reports, with a `sha256.<file>` tag per file.
Aliases, not the deprecated stages: `candidate` (set when the quality gate passed) and
`production`. Every promotion and rollback appends one `kiln.history.NNNN` tag to the
registered model (who, when, from which version to which): the history is append-only and
nothing is ever deleted. Changes are serialized by a lock (a file beside a local store, a PostgreSQL advisory lock for a
tracking server), so concurrent promotions from any machines all land in the history, one after
the other.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path

from pipeline.errors import KilnError
from pipeline.io import sha256, writable_folder
from pipeline.tracking import LOCK_DATABASE_ENV, client, lock, shared_lock_url

CANDIDATE, PRODUCTION = "candidate", "production"
HISTORY = "kiln.history."
EVAL_TAG = "eval."  # eval.<model>.<metric>: what the next version's gate compares against
SHIPPED = "dpo"  # the checkpoint that becomes the GGUF files
# The files that make two versions the same model. The card and reports name their pipeline run,
# so two runs of the same model differ there and nowhere that matters.
MODEL_FILES = ("gguf/", "hf/")


def model_name(profile: str) -> str:
    return f"kiln-{profile}"


def _files(folder: Path) -> dict[str, Path]:
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}


def _lock(uri: str, name: str):
    """Serializes the changes to one registered model among everyone using `uri`: a file beside a
    local store; for a tracking server, an advisory lock in the deployment's PostgreSQL, since
    release managers run the commands from different machines."""
    if not uri.startswith("sqlite:") and not shared_lock_url(uri):
        raise KilnError(
            f"changing {name} on the tracking server {uri} needs {LOCK_DATABASE_ENV} (the PostgreSQL "
            "whose advisory lock serializes releases across machines; `make services` prints it)"
        )
    return lock(uri, f"{name}.registry")


def _reachable(uri: str) -> None:
    """A tracking server that does not accept connections is said so at once, in one line
    (MLflow would retry, then report it as whatever it was asked for being missing)."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=5).close()
    except OSError as exc:
        raise KilnError(f"the tracking server at {uri} is unreachable ({exc.strerror or exc})") from None


def _not_found(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(exc).lower()


def _call(uri: str, what: str, fn):
    """Run a registry call; an unreachable or broken store becomes one clear line."""
    _reachable(uri)
    try:
        return fn()
    except KilnError:
        raise
    except Exception as exc:  # mlflow raises many types for these
        raise KilnError(f"{what}: the registry at {uri} answered: {str(exc).splitlines()[0][:200]}") from None


def bundle_hashes(bundle: Path) -> dict[str, str]:
    """`sha256.<file>` of every file of a bundle: the tags a version is verified against."""
    return {f"sha256.{rel}": sha256(p) for rel, p in _files(bundle).items()}


def _model_part(tags: dict) -> dict:
    return {k: v for k, v in tags.items() if k.startswith(tuple(f"sha256.{f}" for f in MODEL_FILES))}


def same_model(uri: str, profile: str, hashes: dict[str, str]) -> str | None:
    """The newest version holding exactly these model files (GGUF and HF, by sha256), or None."""
    c = client(uri)
    name = model_name(profile)
    wanted = _model_part(hashes)

    def do() -> str | None:
        try:
            c.get_registered_model(name)
        except Exception:  # nothing registered yet
            return None
        same = [v for v in _versions(c, name) if _model_part(v.tags) == wanted]
        return str(same[-1].version) if same else None

    return _call(uri, f"looking for {name}'s versions", do)


def aliases_of(uri: str, profile: str, version: str) -> list[str]:
    """The aliases (candidate, production) that point at `version`."""
    aliases = client(uri).get_registered_model(model_name(profile)).aliases
    return sorted(a for a, v in aliases.items() if str(v) == str(version))


def register(
    uri: str, profile: str, run_id: str, bundle: Path, tags: dict, gate_passed: bool, hashes: dict | None = None
) -> str:
    """Log `bundle` (a folder of files) to the run and register it as a new version. Each
    registration gets its own artifact folder: one run may register more than once, and a shared
    folder would let the later files replace an earlier version's, which then fail its hashes.
    `hashes` are the bundle's `bundle_hashes` when the caller has them already."""
    c = client(uri)
    name = model_name(profile)
    hashes = hashes or bundle_hashes(bundle)
    folder = f"registered/{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"

    def do() -> str:
        c.log_artifacts(run_id, str(bundle), folder)
        source = f"{c.get_run(run_id).info.artifact_uri}/{folder}"
        with _lock(uri, name):
            try:
                c.get_registered_model(name)
            except Exception:  # not there yet
                c.create_registered_model(name, description=f"kiln GGUF models, profile {profile}")
            version = c.create_model_version(name, source, run_id=run_id, tags={**tags, **hashes})
            if gate_passed:
                c.set_registered_model_alias(name, CANDIDATE, version.version)
        return str(version.version)

    return _call(uri, f"registering {name}", do)


def _versions(c, name: str) -> list:
    return sorted(c.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))


def list_versions(uri: str, profile: str) -> list[dict]:
    c = client(uri)
    name = model_name(profile)

    def do():
        try:
            aliases = c.get_registered_model(name).aliases  # alias -> version
        except Exception:
            raise KilnError(f"no registered model {name} at {uri} (run the pipeline first)") from None
        by_version: dict[str, list[str]] = {}
        for alias, v in aliases.items():
            by_version.setdefault(str(v), []).append(alias)
        return [
            {
                "version": str(v.version),
                "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(v.creation_timestamp / 1000)),
                "aliases": ",".join(sorted(by_version.get(str(v.version), []))),
                **{k.removeprefix("metric."): val for k, val in v.tags.items() if k.startswith("metric.")},
                **{k.removeprefix("size."): val for k, val in v.tags.items() if k.startswith("size.")},
            }
            for v in _versions(c, name)
        ]

    return _call(uri, "listing versions", do)


def history(uri: str, profile: str) -> list[dict]:
    c = client(uri)
    tags = _call(uri, "reading history", lambda: c.get_registered_model(model_name(profile)).tags)
    return [json.loads(v) for k, v in sorted(tags.items()) if k.startswith(HISTORY)]


def _production_stack(events: list[dict]) -> list[str]:
    """Versions that held production, oldest first, after replaying promotions and rollbacks."""
    stack: list[str] = []
    for e in events:
        if e["action"] == "promote":
            stack.append(e["to"])
        elif e["action"] == "rollback" and stack:
            stack.pop()
    return stack


def verify(uri: str, profile: str, version: str, dst: Path) -> Path:
    """Download a version's files into `dst` and check that they are exactly the hashed ones:
    each matches its sha256 tag, none is missing, none was added. Returns the folder."""
    import mlflow.artifacts

    c = client(uri)
    name = model_name(profile)
    mv = _call(uri, "reading the version", lambda: c.get_model_version(name, version))
    local = _call(
        uri, "downloading the files",
        lambda: mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(dst), tracking_uri=uri),
    )  # fmt: skip
    files = _files(Path(local))
    expected = {k.removeprefix("sha256."): h for k, h in mv.tags.items() if k.startswith("sha256.")}
    if not expected:
        raise KilnError(f"{name} version {version} has no sha256 tags to verify against")
    extra = sorted(set(files) - set(expected))
    if extra:  # an added file (a tokenizer, a config) would be loaded with the verified ones
        raise KilnError(f"{name} version {version}: {extra[0]} is stored but has no sha256 tag (files added)")
    for rel, digest in expected.items():
        if rel not in files:
            raise KilnError(f"{name} version {version}: {rel} is missing from the stored files")
        if sha256(files[rel]) != digest:
            raise KilnError(f"{name} version {version}: {rel} does not match its sha256 tag (files changed)")
    return Path(local)


def _resolve(c, name: str, alias_or_version: str) -> str:
    """The version number; only a "does not exist" answer means there is no such version
    (anything else reaches `_call` and is reported as what it is)."""
    try:
        if alias_or_version.isdigit():
            return str(c.get_model_version(name, alias_or_version).version)
        return str(c.get_model_version_by_alias(name, alias_or_version).version)
    except Exception as exc:
        if not _not_found(exc):
            raise
        what = (
            f"version {alias_or_version}" if alias_or_version.isdigit() else f"version with alias {alias_or_version!r}"
        )
        raise KilnError(f"{name} has no {what}") from None


def resolve(uri: str, profile: str, alias_or_version: str) -> tuple[str, dict[str, str]]:
    """The version number an alias (or a number) names now, and that version's tags."""
    c = client(uri)
    name = model_name(profile)
    version = _call(uri, "resolving", lambda: _resolve(c, name, alias_or_version))
    return version, dict(_call(uri, "reading the version", lambda: c.get_model_version(name, version)).tags)


def _append_history(c, name: str, event: dict) -> str:
    index = sum(1 for k in c.get_registered_model(name).tags if k.startswith(HISTORY))
    c.set_registered_model_tag(name, f"{HISTORY}{index:04d}", json.dumps(event))
    return f"{HISTORY}{index:04d}"


def _move_production(c, name: str, event: dict) -> dict:
    """Record `event` in the history, then point production at its version. The registry cannot write
    both at once: a failed alias write takes the event back, and a command that dies between the two
    leaves the history one step ahead, which the next promote or rollback completes (`_complete_move`)."""
    tag = _append_history(c, name, event)
    try:
        c.set_registered_model_alias(name, PRODUCTION, event["to"])
    except Exception:
        with contextlib.suppress(Exception):  # if this fails too, _complete_move finishes the move later
            c.delete_registered_model_tag(name, tag)
        raise
    return event


def _complete_move(c, name: str, events: list[dict]) -> None:
    """Production where the last event put it, when it is still where that event found it: the state an
    interrupted `_move_production` leaves. An alias moved by hand elsewhere is left alone."""
    if events and events[-1]["to"] != _current(c, name) == events[-1]["from"]:
        c.set_registered_model_alias(name, PRODUCTION, events[-1]["to"])


def _who() -> str:
    return os.environ.get("KILN_USER") or getpass.getuser()


def promote(uri: str, profile: str, version: str | None = None, note: dict | None = None) -> dict:
    """Point `production` at `version` (default: the candidate) after verifying its files. `note`
    (who decided and why, e.g. a canary analysis) goes into the history event."""
    c = client(uri)
    name = model_name(profile)
    target = _call(uri, "promote", lambda: _resolve(c, name, version or CANDIDATE))
    with tempfile.TemporaryDirectory(prefix="kiln-verify-") as tmp:  # removed on every path
        verify(uri, profile, target, Path(tmp))

    def do():
        with _lock(uri, name):  # read the current production and write the event as one step
            _complete_move(c, name, history(uri, profile))
            previous = _current(c, name)
            event = {"action": "promote", "to": target, "from": previous, "who": _who(), "when": time.time()}
            return _move_production(c, name, {**event, **(note or {})})

    return _call(uri, "promote", do)


def record_event(uri: str, profile: str, event: dict) -> dict:
    """Append one event (an `action`, `from`, `to` and whatever else says why) to the model's history,
    stamped with who and when; the aliases do not move."""
    c = client(uri)
    name = model_name(profile)

    def do():
        with _lock(uri, name):
            stamped = {**event, "who": _who(), "when": time.time()}
            _append_history(c, name, stamped)
            return stamped

    return _call(uri, f"recording {event.get('action')}", do)


def guarded(uri: str, what: str, fn):
    """`fn()` against the registry at `uri`, its failure one clear line (for modules beside this one)."""
    return _call(uri, what, fn)


def _production(c, name: str):
    """The model version `production` points at, or None."""
    try:
        return c.get_model_version_by_alias(name, PRODUCTION)
    except Exception:  # no such model or alias yet
        return None


def _current(c, name: str) -> str | None:
    prod = _production(c, name)
    return str(prod.version) if prod else None


def rollback(uri: str, profile: str) -> dict:
    """Point `production` back to the version that held it before the last promotion, after
    verifying that version's files."""
    c = client(uri)
    name = model_name(profile)

    def do():
        with _lock(uri, name):
            _complete_move(c, name, history(uri, profile))
            stack = _production_stack(history(uri, profile))
            if len(stack) < 2:
                raise KilnError(f"{name}: no earlier production version to roll back to")
            previous, target = stack[-1], stack[-2]
            with tempfile.TemporaryDirectory(prefix="kiln-verify-") as tmp:  # its files, as for a promotion
                verify(uri, profile, target, Path(tmp))
            event = {"action": "rollback", "to": target, "from": previous, "who": _who(), "when": time.time()}
            return _move_production(c, name, event)

    return _call(uri, "rollback", do)


def pull(uri: str, profile: str, alias_or_version: str, out: Path) -> Path:
    """Download a version's files into `out`, verified against their hashes."""
    out = Path(out)
    if out.exists():
        writable_folder(out)  # a file or a read-only folder is refused before anything is downloaded
    c = client(uri)
    version = _call(uri, "pull", lambda: _resolve(c, model_name(profile), alias_or_version))
    with tempfile.TemporaryDirectory(prefix="kiln-verify-") as tmp:
        local = verify(uri, profile, version, Path(tmp))
        writable_folder(out)
        for rel, p in _files(local).items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, out / rel)
    return out


def production_metrics(uri: str, profile: str) -> dict[str, float] | None:
    """The `eval.*` figures tagged on the production version (None when nothing is in production)."""
    prod = _production(client(uri), model_name(profile))
    if prod is None:
        return None
    return {k.removeprefix(EVAL_TAG): float(v) for k, v in prod.tags.items() if k.startswith(EVAL_TAG)}


def quality_gate(uri: str, profile: str, parity: bool, report: dict, settings) -> tuple[bool, str]:
    """The gate before `candidate`: GGUF parity, then the eval gate (`evaluation.gate`) of the
    shipped model against production and of its quantized GGUF against it."""
    from pipeline.eval.evaluation import gate

    if not parity:
        return False, "GGUF parity failed"
    passed, lines = gate(
        report, SHIPPED, production_metrics(uri, profile), settings.max_regression, settings.max_score_drop,
        quantized=report.get("quantized"),
    )  # fmt: skip
    return passed, "; ".join(lines)


def version_tags(dagster_run_id: str, gate: str, bundle: dict, report: dict) -> dict[str, str]:
    """A new version's tags: its pipeline run, the gate's verdict, the bundle's key metrics and file
    sizes (`build_bundle`), and the eval figures of the shipped model and its quantized GGUF
    (`eval.*`, what the next version's gate compares against)."""
    from pipeline.eval.evaluation import flat_metrics

    evals = flat_metrics(report, [SHIPPED, report["quantized"]] if report["quantized"] else [SHIPPED])
    return {
        "dagster_run_id": dagster_run_id,
        "gate": gate,
        **{f"metric.{k}": f"{v:.6g}" for k, v in bundle["metrics"].items() if isinstance(v, int | float)},
        **{f"{EVAL_TAG}{k}": f"{v:.6g}" for k, v in evals.items()},
        **{f"size.{k}": str(v) for k, v in bundle["sizes"].items()},
    }
