"""Hugging Face models in kiln's model cache: download, list, describe, and find the one a
profile's `model.from_pretrained` names.

The cache is huggingface_hub's own layout (`models--org--name/{blobs,refs,snapshots}`) in
`layout.model_cache_dir()`, so `huggingface_hub` and `transformers` read it as they read
~/.cache/huggingface. A download goes to a staging cache beside it first and is moved in only
once every file has arrived and the snapshot has weights and a tokenizer: an interrupted or
refused download leaves nothing in the cache. Offline (`HF_HUB_OFFLINE=1`, which `kiln` sets for
every command but `download`), a model that is not in the cache is one error line, never a wait
on the network. `HF_TOKEN` (or a token stored by `hf auth login`) opens gated models.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pipeline.errors import KilnError
from pipeline.io import atomic_path
from pipeline.layout import model_cache_dir

# What a checkpoint needs, and nothing it does not: safetensors weights only (no .bin, .onnx or
# .gguf duplicates), the configs, the tokenizer in either form, and the card for its license.
MODEL_FILES = [
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "chat_template.jinja", "README.md", "LICENSE*",
]  # fmt: skip
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def is_folder_ref(ref: str) -> bool:
    """A save_pretrained folder rather than a hub id: it exists, or it is written as a path."""
    return Path(ref).is_dir() or ref.startswith(("/", "./", "../", "~"))


def check_checkpoint(folder: Path, name: str) -> None:
    """A KilnError naming `name` unless `folder` has a config, every weight shard and a tokenizer.
    A snapshot whose download stopped part-way lacks some of them (or has links to missing blobs)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise KilnError(f"{name}: no config.json in {folder} (not a model, or a partial download)")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise KilnError(
                f"{name}: {len(missing)} of {len(shards)} weight shards missing in {folder} ({missing[0]}, ...): "
                "a partial download; run `kiln download` again"
            )
    elif not any(p.is_file() for p in folder.glob("*.safetensors")):
        raise KilnError(f"{name}: no .safetensors weights in {folder} (a partial download, or only .bin weights)")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise KilnError(f"{name}: no tokenizer in {folder} (neither tokenizer.json nor tokenizer.model)")


def resolve(ref: str, revision: str | None = None, cache: Path | None = None) -> Path:
    """The checkpoint folder of `ref`: a save_pretrained folder as it is, or a hub id's snapshot in
    the cache (never the network). Checked to be complete."""
    if is_folder_ref(ref):
        folder = Path(ref).expanduser()
        if not folder.is_dir():
            raise KilnError(f"{ref}: no such model folder")
        check_checkpoint(folder, ref)
        return folder
    folder = _cached_snapshot(ref, revision, cache or model_cache_dir())
    if folder is None:
        at = f"@{revision}" if revision else ""
        raise KilnError(
            f"{ref}{at}: not in the model cache {cache or model_cache_dir()}; run `kiln download {ref}` first"
        )
    check_checkpoint(folder, ref)
    return folder


def _cached_snapshot(repo_id: str, revision: str | None, cache: Path) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=str(cache), local_files_only=True))
    except HFValidationError:
        raise KilnError(f"{repo_id!r}: not a model id (org/name) or an existing folder") from None
    except IncompleteSnapshotError:
        raise KilnError(f"{repo_id}: a partial download in {cache}; run `kiln download {repo_id}` again") from None
    except LocalEntryNotFoundError:
        return None


def download(repo_id: str, revision: str | None = None, cache: Path | None = None, say=print) -> Path:
    """`repo_id` at `revision` (default: main) in the cache, downloaded unless it is there already.
    Returns the snapshot folder."""
    from huggingface_hub import constants

    cache = Path(cache or model_cache_dir())
    if is_folder_ref(repo_id):
        raise KilnError(f"{repo_id}: a folder, not a hub id; name it in model.from_pretrained as it is")
    offline = constants.is_offline_mode()
    try:
        cached = _cached_snapshot(repo_id, revision, cache)
        if cached is not None:
            check_checkpoint(cached, repo_id)
            say(f"{repo_id}: already in the cache ({cached})")
            return cached
    except KilnError as exc:  # a partial snapshot: fetched again whole, unless offline
        if offline:
            raise
        say(f"{exc}: downloading it again")
    if offline:
        raise KilnError(
            f"{repo_id}: not in the model cache {cache} and HF_HUB_OFFLINE=1: download it where the hub is reachable"
        )
    staging = cache / f".staging-{os.getpid()}"
    try:
        staged = _fetch(repo_id, revision, staging)
        check_checkpoint(staged, repo_id)
        final = _move_into_cache(staging, cache, staged)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    say(f"{repo_id}: downloaded to {final}")
    return final


def _fetch(repo_id: str, revision: str | None, staging: Path) -> Path:
    """snapshot_download into `staging`, its failures as one line each."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=str(staging), allow_patterns=MODEL_FILES))
    except HFValidationError:
        raise KilnError(f"{repo_id!r}: not a model id (org/name)") from None
    except GatedRepoError:  # before RepositoryNotFoundError, which it specializes
        raise KilnError(
            f"{repo_id}: a gated model: accept its terms on its hub page, then set HF_TOKEN to a token of that account"
        ) from None
    except RepositoryNotFoundError:
        raise KilnError(f"{repo_id}: no such model on the hub (or a private one: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise KilnError(f"{repo_id}: no revision {revision!r} (a branch, tag or commit)") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, *_transport_errors()) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KilnError(f"{repo_id}: the download failed ({first[:200]}); nothing was kept, run it again") from None


def _transport_errors() -> tuple[type[Exception], ...]:
    """What huggingface_hub's HTTP client raises when a connection drops after its own retries."""
    try:
        import httpx2  # huggingface_hub 2's client

        return (httpx2.HTTPError,)
    except ImportError:
        return ()


def _move_into_cache(staging: Path, cache: Path, staged_snapshot: Path) -> Path:
    """Move a complete staged repo into the cache: blobs first (content-addressed, so one already
    there is the same file), then the snapshot folder in one rename, then the refs. A crash in
    between leaves unreferenced blobs at most, never a snapshot with files missing."""
    repo_dir = staged_snapshot.parent.parent
    target = cache / repo_dir.relative_to(staging)
    (target / "blobs").mkdir(parents=True, exist_ok=True)
    for blob in (repo_dir / "blobs").iterdir():
        if not (target / "blobs" / blob.name).exists():
            os.replace(blob, target / "blobs" / blob.name)
    (target / "snapshots").mkdir(exist_ok=True)
    final = target / "snapshots" / staged_snapshot.name
    if final.exists():  # an incomplete copy from before: the staged one replaces it
        shutil.rmtree(final)
    os.replace(staged_snapshot, final)  # its links are relative (../../blobs/...), valid in the new place
    for ref in (repo_dir / "refs").rglob("*"):
        if ref.is_file():
            with atomic_path(target / "refs" / ref.relative_to(repo_dir / "refs")) as tmp:
                tmp.write_text(ref.read_text())
    return final


def list_cached(cache: Path | None = None) -> list[dict]:
    """Every model revision in the cache: id, revision, refs, files, bytes, and whether it is
    complete (a partial one says what it lacks)."""
    cache = Path(cache or model_cache_dir())
    rows = []
    for repo in sorted(cache.glob("models--*")):
        repo_id = "/".join(repo.name.split("--")[1:])
        refs = {}
        for ref in (repo / "refs").rglob("*") if (repo / "refs").is_dir() else []:
            if ref.is_file():
                refs.setdefault(ref.read_text().strip(), []).append(str(ref.relative_to(repo / "refs")))
        for snapshot in sorted((repo / "snapshots").glob("*")):
            files = [f for f in snapshot.rglob("*") if f.is_file() or f.is_symlink()]
            try:
                check_checkpoint(snapshot, repo_id)
                state = "complete"
            except KilnError as exc:
                state = str(exc).split(": ", 1)[1].split(" in ")[0]
            rows.append({
                "model": repo_id, "revision": snapshot.name, "refs": sorted(refs.get(snapshot.name, [])),
                "files": len(files), "bytes": sum(f.stat().st_size for f in files if f.exists()), "state": state,
                "path": str(snapshot),
            })  # fmt: skip
    return rows


def describe(ref: str, revision: str | None = None, cache: Path | None = None) -> dict:
    """What `kiln download --info` prints: architecture, shape, parameters, tokenizer, license, files."""
    from pipeline.train.tokenizer import tokenizer_kind

    folder = resolve(ref, revision, cache)
    cfg = json.loads((folder / "config.json").read_text())
    tokenizer = {"kind": "SentencePiece (tokenizer.model only)"}
    if (folder / "tokenizer.json").is_file():
        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        tokenizer = {"kind": tokenizer_kind(spec), "vocab_size": len(spec["model"].get("vocab", []))}
    tok_cfg = _json_or_empty(folder / "tokenizer_config.json")
    tokenizer["chat_template"] = bool(tok_cfg.get("chat_template") or (folder / "chat_template.jinja").is_file())
    tokenizer.update({k: tok_cfg[k] for k in ("bos_token", "eos_token") if isinstance(tok_cfg.get(k), str)})
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "max_position_embeddings", "tie_word_embeddings", "rope_theta", "rope_scaling")  # fmt: skip
    return {
        "model": ref,
        "path": str(folder),
        "architecture": (cfg.get("architectures") or [cfg.get("model_type")])[0],
        "model_type": cfg.get("model_type"),
        "config": {k: cfg[k] for k in keys if k in cfg},
        "parameters": count_parameters(folder),
        "tokenizer": tokenizer,
        "license": card_license(folder / "README.md"),
        "files": {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()},
    }


def count_parameters(folder: Path) -> int:
    """Parameters in the safetensors files, from their headers alone (no weights are read)."""
    total = 0
    for shard in Path(folder).glob("*.safetensors"):
        with open(shard, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for name, entry in header.items():
            if name != "__metadata__":
                n = 1
                for d in entry["shape"]:
                    n *= d
                total += n
    return total


def card_license(readme: Path) -> str | None:
    """The `license:` of a model card's YAML front matter, None without one."""
    import yaml

    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    try:
        meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    except (yaml.YAMLError, IndexError):
        return None
    return meta.get("license") if isinstance(meta, dict) else None


def _json_or_empty(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def read_model_list(path: Path) -> list[tuple[str, str | None]]:
    """`--config models.yaml`: `models:` a list of ids, or of {id, revision} mappings."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise KilnError(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise KilnError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list) or not models:
        raise KilnError(f"{path}: expected `models:` with a list of model ids")
    out = []
    for i, entry in enumerate(models):
        if isinstance(entry, str):
            out.append((entry, None))
        elif isinstance(entry, dict) and isinstance(entry.get("id"), str) and set(entry) <= {"id", "revision"}:
            out.append((entry["id"], None if entry.get("revision") is None else str(entry["revision"])))
        else:
            raise KilnError(f"{path}: models[{i}]: expected a model id or {{id, revision}}, got {entry!r}"[:200])
    return out
