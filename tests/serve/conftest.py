"""Fixtures for kiln serve against real llama-server processes on the test-sized GGUF.

Every gateway runs in a thread of the test process (uvicorn) with its replicas as child processes on
free loopback ports; fixtures stop them by PID, also when a test fails. Without a built llama-server
(`python -m pipeline.serve.engine`) the tests that need one skip and say so.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import httpx
import pytest
from served import Gateway, llama_server_or_skip

WAIT_S = 60  # a generous deadline for something that happens in well under a second on an idle machine


def wait_for(condition, what: str, timeout: float = WAIT_S, every: float = 0.05):
    """Poll `condition()` until it is truthy (returned) or `timeout` passes (AssertionError naming `what`)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(every)


@pytest.fixture(scope="module")
def writer_at_normal_priority():
    """For tests about what traces hold, not about priority: at the lowest priority a trace writer on a
    machine whose cores are busy (a loaded CI runner) may not run for minutes. Module-scoped, and used
    with `pytestmark = pytest.mark.usefixtures(...)`, so it is set before the module's gateways start."""
    saved = os.environ.get("KILN_TRACE_NICE")
    os.environ["KILN_TRACE_NICE"] = "0"
    yield
    if saved is None:
        os.environ.pop("KILN_TRACE_NICE", None)
    else:
        os.environ["KILN_TRACE_NICE"] = saved


@pytest.fixture(scope="session")
def llama_server() -> Path:
    return llama_server_or_skip()  # a failure instead under make test and CI


@pytest.fixture(scope="session")
def env(llama_server, tmp_path_factory):
    """The binary pinned by path and the cache in tmp, so pulled versions never touch ~/.cache."""
    saved = {k: os.environ.get(k) for k in ("KILN_LLAMA_SERVER", "KILN_CACHE_DIR")}
    os.environ["KILN_LLAMA_SERVER"] = str(llama_server)
    os.environ["KILN_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def unloadable_gguf(path: Path) -> bytes:
    """`path`'s bytes with its architecture renamed (`llama` -> `llamb`, keys and value alike, same
    lengths): every reader of GGUF metadata still reads it, but llama-server exits at start."""
    from gguf import GGUFReader

    data = Path(path).read_bytes()
    header = GGUFReader(str(path)).data_offset
    return data[:header].replace(b"llama", b"llamb") + data[header:]


def register_ggufs(root: Path, payloads: list[bytes], presets: dict[int, dict] | None = None) -> str:
    """A sqlite registry of kiln-test under `root`: version n holds `payloads[n-1]` as its Q4_K_M GGUF
    (and `presets[n]` as its presets.json); production -> 1. Returns the tracking URI."""
    from pipeline.release import registry
    from pipeline.tracking import pipeline_run

    uri = f"sqlite:///{root / 'mlflow.db'}"
    for n, data in enumerate(payloads, 1):
        bundle = root / f"bundle{n}"
        (bundle / "gguf").mkdir(parents=True)
        (bundle / "gguf" / "kiln-test-Q4_K_M.gguf").write_bytes(data)
        if n in (presets or {}):
            (bundle / "presets.json").write_text(json.dumps(presets[n]))
        registry.register(uri, "test", pipeline_run(uri, "test", f"run-{n}"), bundle, {}, gate_passed=True)
    registry.promote(uri, "test", "1")
    return uri


@pytest.fixture(scope="session")
def store(ggufs, tmp_path_factory):
    """A sqlite registry of kiln-test: versions 1 and 2 (2 ships a presets.json), version 3 whose GGUF
    llama-server cannot load (its sha256 tag matches: pulled and verified, it fails to start);
    production -> 1. A test that moves the alias puts it back (`restore_production`)."""
    root = tmp_path_factory.mktemp("registry")
    good = Path(ggufs["Q4_K_M"]).read_bytes()
    v2_presets = {"v2only": {"temperature": 0.0, "max_tokens": 4}}
    uri = register_ggufs(root, [good, good, unloadable_gguf(ggufs["Q4_K_M"])], {2: v2_presets})
    profile = root / "test.yaml"
    profile.write_text("base: tiny\n")
    return uri, profile


@pytest.fixture
def restore_production(store):
    """Puts the production alias back where the test found it."""
    from pipeline.release import registry

    uri, _ = store
    before = registry.resolve(uri, "test", "production")[0]
    yield before
    if registry.resolve(uri, "test", "production")[0] != before:
        registry.promote(uri, "test", before)


@pytest.fixture
def gateway(env, ggufs):
    """gateway(**settings) -> a running Gateway on the test GGUF file."""
    from pipeline.serve.server import file_target

    started = []

    def start(**settings):
        gw = Gateway(file_target(Path(ggufs["Q4_K_M"])), **settings)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.close()


def events(response: httpx.Response) -> list[tuple[str, dict]]:
    """A server-sent event stream, parsed event by event: (event name, data)."""
    found, name = [], "message"
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            found.append((name, json.loads(line[6:])))
            name = "message"
    return found


def slots_busy(replica) -> int:
    """How many of the replica's slots are generating, from llama-server's own /slots."""
    slots = httpx.get(f"{replica.url}/slots", headers=replica.headers, timeout=30).json()
    return sum(1 for slot in slots if slot["is_processing"])


def upstream_requests(replica) -> dict[str, float]:
    """llama-server's own requests_processing and requests_deferred."""
    text = httpx.get(f"{replica.url}/metrics", headers=replica.headers, timeout=30).text
    found = {}
    for line in text.splitlines():
        for kind in ("processing", "deferred"):
            if line.startswith(f"llamacpp:requests_{kind} "):
                found[kind] = float(line.split()[-1])
    return found


def raw_request(url: str, path: str, body: dict, headers: dict | None = None) -> socket.socket:
    """An HTTP request written on a plain socket, nothing read: the test decides when the client leaves."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    head = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json", f"Content-Length: {len(data)}"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data)
    return sock


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    """Read from `sock` until `marker` arrived (the first data event of a stream, say)."""
    got = b""
    while marker not in got:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"the connection closed before {marker!r}: {got[-300:]!r}")
        got += chunk
    return got


def close_abruptly(sock: socket.socket) -> None:
    sock.close()
