"""kiln's model cache, offline: `kiln download` of a cached model, `--list`, `--info`, `--config`,
and the refusals (a model not in the cache while offline, a partial snapshot, no tokenizer, an
unknown or gated model, a download that fails part-way). The hub itself is never reached: the
models are built here and stored in huggingface_hub's cache layout, and the hub's refusals come
from a stand-in hub on a loopback port that answers as the hub does."""

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hub_models import COMMIT, byte_level_tokenizer, sample_texts, save_in_hub_cache, tiny_llama

from pipeline.cli import main
from pipeline.errors import KilnError
from pipeline.train import hub


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Two models in the cache: one in a single weights file, one in several shards."""
    folder = tmp_path_factory.mktemp("model_cache")
    tok = byte_level_tokenizer(sample_texts(100))
    save_in_hub_cache(tiny_llama(tok, tie=False), tok, folder, "test/untied")
    save_in_hub_cache(tiny_llama(tok, tie=True), tok, folder, "test/sharded", max_shard_size="300KB")
    return folder


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_cached_model_downloads_from_the_cache(cache, capsys):
    code, _, err = run_cli(capsys, "download", "test/untied", "--cache", str(cache))
    assert code == 0
    assert "already in the cache" in err
    assert hub.resolve("test/untied", cache=cache) == cache / "models--test--untied" / "snapshots" / COMMIT


def test_offline_a_model_not_in_the_cache_is_one_line(cache, capsys):
    code, out, err = run_cli(capsys, "download", "test/absent", "--cache", str(cache))
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1
    assert "test/absent: not in the model cache" in err
    assert "HF_HUB_OFFLINE=1" in err
    with pytest.raises(KilnError, match="run `kiln download test/absent` first"):
        hub.resolve("test/absent", cache=cache)


def test_download_wants_exactly_one_thing_to_do(cache, capsys):
    for argv in ([], ["test/untied", "--list"]):
        code, _, err = run_cli(capsys, "download", *argv, "--cache", str(cache))
        assert code == 2
        assert err.startswith("kiln: error: give one of MODEL_ID, --config FILE, --list or --info")


def test_list_shows_each_model_with_its_size(cache, capsys):
    code, out, _ = run_cli(capsys, "download", "--list", "--json", "--cache", str(cache))
    rows = {r["model"]: r for r in json.loads(out)}
    assert code == 0
    assert set(rows) == {"test/untied", "test/sharded"}
    for repo, row in rows.items():
        blobs = (cache / f"models--{repo.replace('/', '--')}" / "blobs").iterdir()
        assert row["bytes"] == sum(b.stat().st_size for b in blobs)
        assert row["state"] == "complete"
        assert row["refs"] == ["main"]
    snapshot = cache / "models--test--sharded" / "snapshots" / COMMIT
    assert rows["test/sharded"]["files"] == len(list(snapshot.iterdir())) > rows["test/untied"]["files"]
    code, table, _ = run_cli(capsys, "download", "--list", "--cache", str(cache))
    assert "test/sharded" in table
    assert "2 revisions" in table


def test_info_describes_the_model(cache, capsys):
    from transformers import AutoModelForCausalLM

    code, out, _ = run_cli(capsys, "download", "--info", "test/untied", "--json", "--cache", str(cache))
    info = json.loads(out)
    model = AutoModelForCausalLM.from_pretrained(info["path"])
    assert code == 0
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["parameters"] == sum(p.numel() for p in model.parameters())  # untied: lm_head counted
    assert info["config"]["num_key_value_heads"] == 2
    assert info["config"]["tie_word_embeddings"] is False
    assert info["tokenizer"]["kind"] == "byte-level BPE"
    assert info["tokenizer"]["chat_template"] is False
    assert info["license"] == "apache-2.0"
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(info["files"])
    code, text, _ = run_cli(capsys, "download", "--info", "test/untied", "--cache", str(cache))
    assert "license:      apache-2.0" in text
    assert f"{info['parameters']:,}" in text


def test_a_config_file_takes_several_models(cache, tmp_path, capsys):
    models = tmp_path / "models.yaml"
    models.write_text("models:\n  - test/untied\n  - {id: test/sharded, revision: main}\n")
    code, _, err = run_cli(capsys, "download", "--config", str(models), "--cache", str(cache))
    assert code == 0
    assert err.count("already in the cache") == 2
    models.write_text("models:\n  - test/untied\n  - {name: test/sharded}\n")
    code, _, err = run_cli(capsys, "download", "--config", str(models), "--cache", str(cache))
    assert code == 2
    assert "models.yaml: models[1]: expected a model id or {id, revision}" in err


def test_the_example_profile_starts_from_a_downloaded_model(capsys):
    from pipeline.config import load_profile
    from pipeline.layout import REPO_ROOT

    example = REPO_ROOT / "docs" / "examples" / "smollm-135m.yaml"
    profile = load_profile(example)
    assert profile.model.from_pretrained == "HuggingFaceTB/SmolLM-135M"
    assert profile.sft.lr == 2e-4
    code, out, _ = run_cli(capsys, "profiles", str(example))
    assert code == 0
    assert "from_pretrained HuggingFaceTB/SmolLM-135M" in out


def test_a_partial_snapshot_is_refused(tmp_path):
    tok = byte_level_tokenizer(sample_texts(100))
    snapshot = save_in_hub_cache(tiny_llama(tok, tie=True), tok, tmp_path, "test/partial", max_shard_size="300KB")
    shards = sorted(set(json.loads((snapshot / "model.safetensors.index.json").read_text())["weight_map"].values()))
    (snapshot / shards[1]).resolve().unlink()  # the blob the link points to, as an interrupted download leaves it
    with pytest.raises(KilnError, match=f"1 of {len(shards)} weight shards missing .* a partial download"):
        hub.resolve("test/partial", cache=tmp_path)
    with pytest.raises(KilnError, match="a partial download"):
        hub.download("test/partial", cache=tmp_path, say=lambda line: None)  # offline: refused, not retried
    assert [r["state"] for r in hub.list_cached(tmp_path)] == [f"1 of {len(shards)} weight shards missing"]


def test_a_checkpoint_without_a_tokenizer_is_refused(tmp_path):
    tok = byte_level_tokenizer(sample_texts(100))
    snapshot = save_in_hub_cache(tiny_llama(tok, tie=True), tok, tmp_path, "test/notok")
    (snapshot / "tokenizer.json").unlink()
    with pytest.raises(KilnError, match="test/notok: no tokenizer"):
        hub.resolve("test/notok", cache=tmp_path)


CONFIG = b'{"model_type": "llama"}'


class StandInHub(BaseHTTPRequestHandler):
    """Answers as the hub answers for `self.server.answer`: an unknown repository, a gated one, or
    one whose listing and config arrive but whose weights then fail."""

    def do_GET(self):
        answer, path = self.server.answer, self.path.split("?")[0]
        if answer == "gated" and self.headers.get("Authorization") == "Bearer hf_granted":
            answer = "complete"  # a token of an account that accepted the terms
        if answer == "complete":
            return self._serve_model(path)
        if answer != "broken":
            status, error = {"unknown": (404, "RepoNotFound"), "gated": (403, "GatedRepo")}[answer]
            return self._send(status, {"X-Error-Code": error, "X-Error-Message": error}, error.encode())
        if "/tree/" in path:
            files = [{"type": "file", "path": name, "size": size, "oid": "0" * 40}
                     for name, size in (("config.json", len(CONFIG)), ("model.safetensors", 1000))]  # fmt: skip
            return self._send(200, {"Content-Type": "application/json"}, json.dumps(files).encode())
        if path.startswith("/api/models/"):
            info = {"id": "org/model", "sha": COMMIT, "siblings": [{"rfilename": "config.json"}]}
            return self._send(200, {"Content-Type": "application/json"}, json.dumps(info).encode())
        if path.endswith("/config.json"):
            etag = '"' + hashlib.sha256(CONFIG).hexdigest() + '"'
            return self._send(200, {"X-Repo-Commit": COMMIT, "ETag": etag}, CONFIG)
        self._send(404, {"X-Error-Code": "EntryNotFound", "X-Error-Message": "gone"}, b"gone")  # the weights

    do_HEAD = do_GET

    def _serve_model(self, path: str):
        files = self.server.files  # name -> bytes of a save_pretrained folder
        if "/tree/" in path:
            tree = [{"type": "file", "path": n, "size": len(b), "oid": "0" * 40} for n, b in files.items()]
            return self._send(200, {"Content-Type": "application/json"}, json.dumps(tree).encode())
        if path.startswith("/api/models/"):
            info = {"id": "org/model", "sha": COMMIT, "siblings": [{"rfilename": n} for n in files]}
            return self._send(200, {"Content-Type": "application/json"}, json.dumps(info).encode())
        body = files[path.rsplit("/", 1)[1]]
        self._send(200, {"X-Repo-Commit": COMMIT, "ETag": '"' + hashlib.sha256(body).hexdigest() + '"'}, body)

    def _send(self, status, headers, body: bytes):
        self.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in_hub(monkeypatch):
    """huggingface_hub online, pointed at a loopback server on a free port."""
    from huggingface_hub import constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), StandInHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ("unknown", "org/model: no such model on the hub"),
        ("gated", "org/model: a gated model: accept its terms on its hub page, then set HF_TOKEN"),
        ("broken", "org/model: the download failed"),
    ],
)
def test_refused_downloads_leave_nothing_in_the_cache(stand_in_hub, tmp_path, answer, message):
    stand_in_hub.answer = answer
    with pytest.raises(KilnError) as err:
        hub.download("org/model", cache=tmp_path, say=lambda line: None)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []  # no repository folder, no staging folder


def test_a_download_enters_the_cache_whole(stand_in_hub, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = byte_level_tokenizer(sample_texts(100))
    tiny_llama(tok, tie=True).save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    stand_in_hub.files = {p.name: p.read_bytes() for p in (tmp_path / "src").iterdir()}
    stand_in_hub.answer = "complete"
    cache = tmp_path / "cache"
    snapshot = hub.download("org/model", cache=cache, say=lambda line: None)
    assert snapshot == cache / "models--org--model" / "snapshots" / COMMIT
    assert sorted(p.name for p in cache.iterdir()) == ["models--org--model"]  # the staging folder is gone
    assert {p.name: p.read_bytes() for p in snapshot.iterdir()} == stand_in_hub.files
    AutoModelForCausalLM.from_pretrained(str(hub.resolve("org/model", cache=cache)))
    AutoTokenizer.from_pretrained(str(snapshot))
    stand_in_hub.answer = "unknown"  # the hub no longer has it: the cached copy is enough
    lines = []
    assert hub.download("org/model", cache=cache, say=lines.append) == snapshot
    assert "already in the cache" in lines[0]


def test_a_gated_model_downloads_with_hf_token(stand_in_hub, tmp_path, monkeypatch):
    tok = byte_level_tokenizer(sample_texts(100))
    tiny_llama(tok, tie=True).save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    stand_in_hub.files = {p.name: p.read_bytes() for p in (tmp_path / "src").iterdir()}
    stand_in_hub.answer = "gated"
    monkeypatch.setenv("HF_TOKEN", "hf_granted")
    snapshot = hub.download("org/model", cache=tmp_path / "cache", say=lambda line: None)
    assert (snapshot / "model.safetensors").read_bytes() == stand_in_hub.files["model.safetensors"]
