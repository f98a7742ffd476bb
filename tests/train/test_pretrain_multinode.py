"""Pretraining across nodes as users run it: docs/deploy/pretrain-multinode.sh started twice on this
machine (node ranks 0 and 1, one gloo process each, a c10d rendezvous on 127.0.0.1), against one
process accumulating the same batches; then a run stopped at a checkpoint, started again, one
node's training process killed, and torchrun's restart resuming from the checkpoint to the same
weights."""

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import load_profile
from pipeline.io import free_port, read_json
from pipeline.layout import REPO_ROOT, BaseModelFiles
from pipeline.train.launch import prepare_run
from pipeline.train.pretrain import pretrain
from pipeline.train.tokenizer import load_tokenizer, texts_of, token_byte_lengths, train_tokenizer

pytestmark = pytest.mark.slow

SCRIPT = REPO_ROOT / "docs" / "deploy" / "pretrain-multinode.sh"
STEPS = 40
PROFILE_YAML = (
    "base: tiny\n"
    "model: {hidden_size: 256, intermediate_size: 256, num_layers: 1, num_heads: 4, num_kv_heads: 2}\n"
    f"pretrain: {{seq_len: 32, micro_batch: 2, grad_accum: 1, steps: {STEPS}, lr: 0.003, warmup_steps: 2, "
    f"eval_every: {STEPS}, eval_batches: 1, checkpoint_every: 2, compile: 'off', precision: fp32}}\n"
    "eval: {max_new_tokens: 16}\n"
)


@pytest.fixture(scope="module")
def work(small_corpus, tmp_path_factory) -> Path:
    """A profile's work folder as the script expects it: clean_corpus/, tokenizer/tokenizer, the profile."""
    from pipeline.data.clean import read_split

    root = tmp_path_factory.mktemp("multinode")
    (root / "clean_corpus").symlink_to(small_corpus)
    tok_dir = root / "tokenizer" / "tokenizer"
    train_tokenizer(texts_of(read_split(small_corpus, "train")), tok_dir, vocab_size=400, min_frequency=1)
    (root / "two.yaml").write_text(PROFILE_YAML)
    return root


def _node(
    work: Path, rank: int, port: int, output: Path, prepare: bool, restarts: int, stop_after: int | None = None
) -> subprocess.Popen:
    env = {
        **os.environ, "NODES": "2", "NODE_RANK": str(rank), "MASTER": "127.0.0.1", "PORT": str(port),
        "LOCAL_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "GPUS_PER_NODE": "1", "OMP_NUM_THREADS": "1",
        "PROFILE": str(work / "two.yaml"), "OUTPUT": str(output), "PYTHON": sys.executable,
        "PREPARE": "1" if prepare else "0", "MAX_RESTARTS": str(restarts), "RUN_ID": f"test-{port}",
        "CUDA_VISIBLE_DEVICES": "", **({"STOP_AFTER": str(stop_after)} if stop_after else {}),
    }  # fmt: skip
    return subprocess.Popen(["bash", str(SCRIPT), str(work)], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def _finish(*nodes: subprocess.Popen, timeout: float = 240) -> list[str]:
    """Wait for every node; a failed or hung one fails the test, and no node is left running.
    Returns what each node printed."""
    printed = []
    try:
        for node in nodes:
            out, _ = node.communicate(timeout=timeout)
            assert node.returncode == 0, out[-3000:]
            printed.append(out)
    finally:
        for node in nodes:
            _stop(node)
    return printed


def _stop(node: subprocess.Popen) -> None:
    """The node's torchrun and the training processes it started (its whole process tree)."""
    if node.poll() is None:
        for child in psutil.Process(node.pid).children(recursive=True):
            child.kill()
        node.kill()
        node.communicate()


def _weights(files: BaseModelFiles) -> dict:
    return load_file(files.model / "model.safetensors")


def _prepare(work: Path, folder: Path) -> BaseModelFiles:
    files = BaseModelFiles(folder)
    prepare_run(work / "clean_corpus", work / "tokenizer" / "tokenizer", files, load_profile(work / "two.yaml"))
    return files


@pytest.fixture(scope="module")
def two_nodes(work, tmp_path_factory) -> tuple[BaseModelFiles, BaseModelFiles, set]:
    """An uninterrupted run: node 0 prepares and writes its folder; node 1 reads a private copy of
    the prepared folder (as if its disk were its own), so anything rank 1 wrote would show there."""
    root = tmp_path_factory.mktemp("two_nodes")
    node0 = _prepare(work, root / "node0")
    shutil.copytree(node0.folder, root / "node1")
    node1 = BaseModelFiles(root / "node1")
    before = {p.relative_to(node1.folder) for p in node1.folder.rglob("*")}
    port = free_port()
    nodes = [_node(work, 0, port, node0.folder, True, 0), _node(work, 1, port, node1.folder, False, 0)]
    _finish(*nodes)
    return node0, node1, before


def test_two_nodes_match_one_process_accumulating_their_batches(work, two_nodes, tmp_path):
    node0, node1, before = two_nodes
    summary = read_json(node0.summary)
    assert summary["devices"] == 2
    assert summary["steps"] == STEPS
    assert summary["resumed_from"] == 0
    # rank 0 alone writes: node 1's folder holds only what was copied into it
    assert {p.relative_to(node1.folder) for p in node1.folder.rglob("*")} == before
    assert not node1.model.exists()
    assert not node1.summary.exists()
    assert not node1.checkpoint.exists()

    profile = load_profile(work / "two.yaml")
    tok = load_tokenizer(work / "tokenizer" / "tokenizer")
    single = dataclasses.replace(profile.pretrain, grad_accum=2)  # rank r, micro-batch 0 = micro-batch r here
    one = BaseModelFiles(tmp_path / "one")
    pretrain(node0.token_file("train"), node0.token_file("validation"), tok, token_byte_lengths(tok), one.folder,
             profile.model, single, progress=False)  # fmt: skip
    ddp, ref = _weights(node0), _weights(one)
    assert ddp.keys() == ref.keys()
    for name in ref:
        assert torch.allclose(ddp[name], ref[name], atol=1e-5, rtol=1e-4), name
    assert not torch.equal(ref["model.norm.weight"], torch.ones_like(ref["model.norm.weight"]))  # it trained


def _worker(node: subprocess.Popen, deadline: float) -> psutil.Process:
    """The training process torchrun started for a node (the script execs torchrun)."""
    while time.monotonic() < deadline:
        assert node.poll() is None, "the node ended before its training process was seen"
        for child in psutil.Process(node.pid).children(recursive=True):
            try:
                if "pipeline.train.launch" in " ".join(child.cmdline()):
                    return child
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.05)
    raise AssertionError("the node's training process did not start")


def test_a_killed_node_restarts_and_resumes_to_the_same_weights(work, two_nodes, tmp_path):
    """A run stopped after step `stop` (STOP_AFTER) leaves its checkpoint on the folder both nodes
    mount, so there is a checkpoint to resume whenever the kill lands: started again, node 1's
    training process is killed as soon as it is seen (it still has most of the run before it)."""
    stop = STEPS // 4
    run = BaseModelFiles(tmp_path / "shared")
    port = free_port()
    _finish(_node(work, 0, port, run.folder, True, 0, stop), _node(work, 1, port, run.folder, False, 0, stop))
    assert torch.load(run.checkpoint, weights_only=False)["step"] == stop
    assert not run.model.exists()
    assert not run.summary.exists()

    port = free_port()
    node0, node1 = _node(work, 0, port, run.folder, False, 1), _node(work, 1, port, run.folder, False, 1)
    try:
        worker = _worker(node1, time.monotonic() + 180)
        worker.kill()
        assert not run.model.exists()
        printed = _finish(node0, node1)
    finally:
        for node in (node0, node1):
            _stop(node)
    # node 1's torchrun saw its process killed (and then, finishing with exit 0, restarted it)
    assert f"failed (exitcode: -9) local_rank: 0 (pid: {worker.pid})" in printed[1]
    summary = read_json(run.summary)
    assert stop <= summary["resumed_from"] < STEPS
    assert summary["steps"] == STEPS
    resumed, uninterrupted = _weights(run), _weights(two_nodes[0])
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name
