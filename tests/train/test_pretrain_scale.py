"""Pretraining at scale without a GPU: which loss runs where, throughput and MFU arithmetic, and
data-parallel training on two gloo processes against one process that accumulates the same batches."""

import dataclasses
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

from pipeline.config import ModelShape, PretrainSettings, load_profile
from pipeline.data.clean import read_split
from pipeline.train.distributed import torchrun_command
from pipeline.train.loss import linear_cross_entropy, loss_kind
from pipeline.train.pretrain import build_base_model, count_parameters, pretrain, tokenize_to_file
from pipeline.train.throughput import flops_per_token, mfu, peak_flops, steady_tokens_per_s
from pipeline.train.tokenizer import load_tokenizer, texts_of, token_byte_lengths, train_tokenizer

SHAPE = ModelShape(hidden_size=256, intermediate_size=256, num_layers=1, num_heads=4, num_kv_heads=2)
DDP_SETTINGS = PretrainSettings(
    seq_len=32, micro_batch=2, grad_accum=2, steps=3, lr=3e-3, warmup_steps=1, eval_every=3, eval_batches=1,
    checkpoint_every=3,
)  # fmt: skip


def test_loss_is_fused_only_on_cuda_with_liger():
    assert loss_kind("cuda", liger_available=True) == "fused"
    assert loss_kind("cuda", liger_available=False) == "chunked"
    assert loss_kind("cpu", liger_available=True) == "chunked"


def test_cpu_loss_is_the_chunked_one_and_exact():
    torch.manual_seed(0)
    kind, loss_fn = linear_cross_entropy("cpu", None)
    hidden, weight = torch.randn(300, 32), torch.randn(70, 32)
    targets = torch.randint(0, 70, (300,))
    assert kind == "chunked"
    assert torch.allclose(
        loss_fn(hidden, weight, targets), torch.nn.functional.cross_entropy(hidden @ weight.T, targets)
    )


def test_mfu_of_the_issue_measurement():
    """110,300 tokens/s of the 300m model (268.7M parameters, 20 layers, d 1024, T 1024) on an
    H100 SXM is 20.8% MFU with 6N + 12 L d T FLOPs per token against 989 TFLOP/s."""
    n = count_parameters(load_profile("300m").model)
    assert round(n / 1e6, 1) == 268.7
    per_token = flops_per_token(n, 20, 1024, 1024)
    assert per_token == 6 * n + 12 * 20 * 1024 * 1024
    assert mfu(110_300, per_token, peak_flops("NVIDIA H100 80GB HBM3")) == pytest.approx(0.208, abs=0.0005)


def test_peak_table_prefers_the_specific_name_and_knows_no_cpu():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA L40S") == 362e12 and peak_flops("NVIDIA L4") == 121e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("cpu") is None and peak_flops("Tesla T4") is None
    assert mfu(1000.0, 1e9, None) is None


def test_steady_state_leaves_out_the_first_steps():
    # compile (10 s) and warm-up steps left out: median of 1, 1, 2 s is 1 s
    assert steady_tokens_per_s([10.0, 5.0, 5.0, 1.0, 2.0, 1.0], tokens_per_step=100) == 100.0
    assert steady_tokens_per_s([4.0, 2.0], tokens_per_step=100) == pytest.approx(100 / 3)  # too few: all of them
    assert steady_tokens_per_s([], tokens_per_step=100) == 0.0


def test_torchrun_command_runs_one_process_per_device():
    cmd = torchrun_command(4, ["pipeline.cli", "pretrain", "--output", "out"])
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert "--nproc-per-node=4" in cmd
    assert cmd[-5:] == ["-m", "pipeline.cli", "pretrain", "--output", "out"]


@pytest.fixture(scope="module")
def token_files(small_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    tok = train_tokenizer(texts_of(read_split(small_corpus, "train")), root / "tok", vocab_size=400, min_frequency=1)
    for split in ("train", "validation"):
        tokenize_to_file(texts_of(read_split(small_corpus, split)), tok, root / f"{split}.bin")
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank: int, port: int, root, out) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2"
    )
    torch.set_num_threads(1)
    tok = load_tokenizer(root / "tok")
    pretrain(root / "train.bin", root / "validation.bin", tok, token_byte_lengths(tok), out, SHAPE, DDP_SETTINGS,
             progress=False)  # fmt: skip


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_accumulating_their_batches(token_files, tmp_path):
    root = token_files
    mp.spawn(_ddp_rank, args=(_free_port(), root, tmp_path / "ddp"), nprocs=2, join=True)
    tok = load_tokenizer(root / "tok")
    single = dataclasses.replace(DDP_SETTINGS, grad_accum=2 * DDP_SETTINGS.grad_accum)  # rank r, micro m = micro 2m+r
    one = pretrain(root / "train.bin", root / "validation.bin", tok, token_byte_lengths(tok), tmp_path / "one", SHAPE,
                   single, progress=False)  # fmt: skip
    ddp_weights = AutoModelForCausalLM.from_pretrained(tmp_path / "ddp" / "model").state_dict()
    one_weights = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "model").state_dict()
    assert ddp_weights.keys() == one_weights.keys()
    for name in one_weights:
        assert torch.allclose(ddp_weights[name], one_weights[name], atol=1e-5, rtol=1e-4), name
    assert not torch.equal(one_weights["model.norm.weight"], torch.ones_like(one_weights["model.norm.weight"]))
    ddp_losses = [h["loss"] for h in json.loads((tmp_path / "ddp" / "metrics.json").read_text())["history"]]
    assert ddp_losses == pytest.approx([h["loss"] for h in one.history], rel=1e-5)  # logged loss: mean over ranks


@pytest.mark.slow
def test_devices_2_starts_torchrun_and_reads_back_the_result(small_corpus, token_files, tmp_path):
    profile_file = tmp_path / "two.yaml"
    profile_file.write_text(
        "base: tiny\n"
        "model: {hidden_size: 256, intermediate_size: 256, num_layers: 1, num_heads: 4, num_kv_heads: 2}\n"
        "pretrain: {seq_len: 32, micro_batch: 2, grad_accum: 1, steps: 2, warmup_steps: 1, eval_every: 2, "
        "eval_batches: 1, checkpoint_every: 2, devices: 2}\n"
        "eval: {max_new_tokens: 16}\n"
    )
    profile = load_profile(profile_file)
    result, baseline = build_base_model(
        small_corpus, token_files / "tok", tmp_path / "out", profile, progress=False, profile_ref=str(profile_file)
    )
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["devices"] == 2 and result.steps == 2 and len(result.history) == 2
    assert result.tokens_seen == 2 * 2 * 32 * 2  # steps x micro_batch x seq_len x processes
    assert baseline == summary["unigram_bpb"] > 0
    assert (tmp_path / "out" / "model" / "model.safetensors").exists()


def test_device_report_on_this_machine(capsys):
    from pipeline.cli import main

    assert main(["device"]) == 0
    report = json.loads(capsys.readouterr().out)
    if not torch.cuda.is_available():
        assert (
            report["device"] == "cpu" and report["pretrain_loss"] == "chunked" and report["bitsandbytes_cuda"] is None
        )
    else:  # the GPU this machine has, and what kiln will train it with
        from pipeline.train.loss import liger_installed

        assert report["device"] == torch.cuda.get_device_name() and report["cuda_version"] == torch.version.cuda
        assert report["pretrain_loss"] == ("fused" if liger_installed() else "chunked")
        assert report["bf16"] == torch.cuda.is_bf16_supported() and isinstance(report["bitsandbytes_cuda"], bool)


def test_device_check_fails_clearly_without_a_cuda_bitsandbytes(monkeypatch, capsys):
    from pipeline.cli import main
    from pipeline.train.device import bitsandbytes_has_cuda

    if bitsandbytes_has_cuda():
        pytest.skip("bitsandbytes here is a CUDA build: the failure cannot be caused")
    # a GPU cannot be added to this machine; the CPU build of bitsandbytes that is loaded here is real
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert main(["device"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kiln: error: a CUDA GPU is here but bitsandbytes has no CUDA build") and err.count("\n") == 1


def test_causal_attention_matches_transformers_sdpa():
    """kiln's maskless causal attention (grouped-query heads as they are) gives the stock model's logits."""
    from pipeline.train.pretrain import build_model, llama_config

    torch.manual_seed(0)
    model = build_model(llama_config(SHAPE, 300, 0, 1, 2, context=64), torch.device("cpu")).eval()
    x = torch.randint(0, 300, (2, 24))
    assert model.config._attn_implementation == "kiln_causal"
    changed = x.clone()
    changed[:, -1] = (x[:, -1] + 1) % 300
    with torch.no_grad():
        ours = model(input_ids=x, use_cache=False).logits
        ours_changed = model(input_ids=changed, use_cache=False).logits
        model.config._attn_implementation = "sdpa"
        stock = model(input_ids=x, use_cache=False).logits
        model.config._attn_implementation = "eager"
        eager = model(input_ids=x, use_cache=False).logits
    assert torch.allclose(ours, stock, atol=1e-5) and torch.allclose(ours, eager, atol=1e-4)
    # causal: a change to the last token moves only the last position's logits
    assert torch.allclose(ours[:, :-1], ours_changed[:, :-1]) and not torch.allclose(ours[:, -1], ours_changed[:, -1])
