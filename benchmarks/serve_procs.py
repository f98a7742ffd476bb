"""The server processes the serving benchmarks start on loopback (serve_load.py, gateway_cpu.py,
serve_faults.py): a stand-in GGUF, llama-server, kiln serve, llama-cpp-python's server and the bare
relay, each a `Proc` stopped by its PID."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.io import free_port  # noqa: E402
from pipeline.serve.settings import ServeSettings  # noqa: E402

REPLICA_NICE = ServeSettings.model_fields["kiln_replica_nice"].default  # kiln serve's replicas run this far below it


def stand_in_gguf(tmp: Path) -> Path:
    """A GGUF of the tiny profile's shape and vocabulary size, random weights, a BPE trained on random words."""
    from transformers import LlamaForCausalLM

    from pipeline.config import load_profile
    from pipeline.release.gguf_export import export_all
    from pipeline.train.pretrain import llama_config
    from pipeline.train.tokenizer import train_tokenizer

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    texts = [" ".join("".join(rng.choices(letters, k=rng.randint(3, 9))) for _ in range(500)) for _ in range(1000)]
    profile = load_profile("tiny")
    tok = train_tokenizer(texts, tmp / "tok", vocab_size=profile.tokenizer.vocab_size, min_frequency=1)
    shape = profile.model
    ids = (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    model = LlamaForCausalLM(llama_config(shape, len(tok), *ids, context=profile.pretrain.seq_len))
    model.save_pretrained(tmp / "model")
    tok.save_pretrained(tmp / "model")
    return export_all(tmp / "model", tmp / "gguf", "bench")["Q4_K_M"]


def eos_id(gguf: Path) -> int:
    from gguf import GGUFReader

    field = GGUFReader(str(gguf)).fields["tokenizer.ggml.eos_token_id"]
    return int(field.parts[field.data[0]][0])


class Proc:
    """A server process on a free port, stopped by its PID."""

    def __init__(
        self, name: str, cmd: list[str], port: int, env: dict | None = None, health: str = "/health",
        host: str = "127.0.0.1",
    ) -> None:  # fmt: skip
        self.name, self.port, self.url, self.health = name, port, f"http://{host}:{port}", health
        self.log = open(Path(tempfile.gettempdir()) / f"kiln-bench-{name}-{port}.log", "wb")  # noqa: SIM115 (lives as long as the child it serves)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    async def ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited; see {self.log.name}")
                try:
                    async with s.get(self.url + self.health) as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout} s; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def llama_server(binary: Path, gguf: Path, slots: int, threads: int, nice: int = 0) -> Proc:
    port = free_port()
    cmd = [*(["nice", "-n", str(nice)] if nice else []),
           str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--parallel", str(slots),
           "--ctx-size", str(2048 * slots), "--threads", str(threads), "--threads-http", str(max(2, slots)),
           "--no-webui", "--metrics"]  # fmt: skip
    return Proc(f"llama-server-{port}", cmd, port)


def kiln(gguf: Path | None, replicas: int, slots: int, env: dict | None = None, extra: list[str] = ()) -> Proc:
    port = free_port()
    settings = {
        "KILN_SLOTS": str(slots), "KILN_THREADS": "1", "MAX_CONCURRENT_INFERENCE": str(max(2, replicas) * slots * 2),
        "KILN_MAX_QUEUE": "1024", "INFERENCE_TIMEOUT_SEC": "120", "PYTHONPATH": str(ROOT), **(env or {}),
    }  # fmt: skip
    source = ["--gguf", str(gguf)] if gguf else []
    cmd = [sys.executable, "-m", "pipeline.cli", "serve", *source, "--replicas", str(replicas), "--port", str(port)]
    return Proc(f"kiln-{port}", [*cmd, *extra], port, settings)


def llama_cpp_python(gguf: Path, threads: int) -> Proc:
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "--n_threads", str(threads), "--n_ctx", "2048", "--interrupt_requests", "False"]  # fmt: skip
    return Proc(f"llama-cpp-python-{port}", cmd, port, health="/v1/models")


def relay(upstreams: list[Proc]) -> list[Proc]:
    """benchmarks/relay.py in front of `upstreams`: the gateway first, as kiln's setups list it."""
    port = free_port()
    cmd = [sys.executable, str(ROOT / "benchmarks" / "relay.py"), str(port), *(u.url for u in upstreams)]
    return [Proc(f"relay-{port}", cmd, port), *upstreams]
