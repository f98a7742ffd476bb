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
from pipeline.layout import BaseModelFiles
from pipeline.train.distributed import Distributed, torchrun_command
from pipeline.train.launch import build_base_model
from pipeline.train.loss import linear_cross_entropy, loss_kind
from pipeline.train.pretrain import build_training, count_parameters, llama_config, pretrain, tokenize_to_file
from pipeline.train.throughput import flops_per_token, matmul_parameters, mfu, peak_flops, steady_tokens_per_s
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


class MatmulDtypes(torch.overrides.TorchFunctionMode):
    """The operand dtypes of every matrix product whose result has `shape`."""

    MATMULS = ("mm", "addmm", "addmm_", "matmul", "__matmul__")

    def __init__(self, shape):
        super().__init__()
        self.shape, self.seen = tuple(shape), []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") in self.MATMULS and tuple(getattr(out, "shape", ())) == self.shape:
            self.seen.append(tuple(a.dtype for a in args if isinstance(a, torch.Tensor) and a.shape != self.shape))
        return out


def test_chunked_loss_multiplies_the_weight_gradient_in_the_compute_dtype():
    """bf16 hidden states: the output weight's gradient (V, d) is multiplied in bf16, not from fp32
    copies, yet comes out fp32 and within bf16 rounding of the fp32 gradient."""
    torch.manual_seed(0)
    n, d, v = 600, 32, 70
    hidden, weight, targets = torch.randn(n, d), torch.randn(v, d, requires_grad=True), torch.randint(0, v, (n,))
    _, loss_fn = linear_cross_entropy("cpu", torch.bfloat16)
    with MatmulDtypes((v, d)) as mode:
        loss_fn(hidden, weight, targets).backward()
    assert mode.seen, mode.seen
    assert all(dtypes == (torch.bfloat16, torch.bfloat16) for dtypes in mode.seen), mode.seen
    assert weight.grad.dtype == torch.float32
    reference = torch.randn(v, d).copy_(weight.detach()).requires_grad_()
    torch.nn.functional.cross_entropy(hidden @ reference.T, targets).backward()
    assert torch.allclose(weight.grad, reference.grad, atol=2e-3, rtol=2e-2)
    assert not torch.equal(weight.grad, reference.grad)  # it did run in bf16


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
    assert peak_flops("NVIDIA L40S") == 362e12
    assert peak_flops("NVIDIA L4") == 121e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("cpu") is None
    assert peak_flops("Tesla T4") is None
    assert mfu(1000.0, 1e9, None) is None


def test_steady_state_leaves_out_the_first_steps():
    # compile (10 s) and warm-up steps left out: median of 1, 1, 2 s is 1 s
    assert steady_tokens_per_s([10.0, 5.0, 5.0, 1.0, 2.0, 1.0], tokens_per_step=100) == 100.0
    assert steady_tokens_per_s([4.0, 2.0], tokens_per_step=100) == pytest.approx(100 / 3)  # too few: all of them
    assert steady_tokens_per_s([], tokens_per_step=100) == 0.0


def test_torchrun_command_runs_one_process_per_device():
    cmd = torchrun_command(4, ["pipeline.train.launch", "out"])
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert "--nproc-per-node=4" in cmd
    assert cmd[-3:] == ["-m", "pipeline.train.launch", "out"]


def _training(shape: ModelShape, world: int, peak: float | None):
    """build_training's state on this one process, then seen as rank 0 of `world` data-parallel
    processes on devices of `peak` FLOP/s (only the arithmetic reads the world size and the peak)."""
    t = build_training(llama_config(shape, 300, 0, 1, 2, context=32), shape, DDP_SETTINGS, Distributed())
    return dataclasses.replace(t, dist=Distributed(rank=0, local_rank=0, world=world), peak_flops=peak)


def test_mfu_is_per_device_and_tokens_per_s_is_the_whole_runs():
    """On 4 data-parallel devices a step moves 4x the tokens, in the same time as one device's
    share: tokens/s is the run's, MFU each device's (not 4x one device's peak)."""
    one, four = _training(SHAPE, 1, 989e12), _training(SHAPE, 4, 989e12)
    assert four.tokens_per_step == 4 * one.tokens_per_step
    step_seconds = 0.5
    per_device = one.mfu(one.tokens_per_step / step_seconds)
    assert four.mfu(four.tokens_per_step / step_seconds) == pytest.approx(per_device)
    assert per_device == pytest.approx(one.tokens_per_step / step_seconds * one.flops_per_token / 989e12)
    assert mfu(4000.0, 1e9, 1e12, devices=4) == pytest.approx(1.0)
    assert _training(SHAPE, 4, None).mfu(1e6) is None


def test_six_n_leaves_out_an_untied_input_embedding():
    untied = dataclasses.replace(SHAPE, tie_embeddings=False)
    t_tied, t_untied = _training(SHAPE, 1, None), _training(untied, 1, None)
    attention = 12 * SHAPE.num_layers * SHAPE.hidden_size * DDP_SETTINGS.seq_len
    # untied: the output layer is a matmul of its own, the input embedding a lookup
    assert t_untied.parameters == t_tied.parameters + 300 * SHAPE.hidden_size
    assert t_untied.flops_per_token == 6 * (t_untied.parameters - 300 * SHAPE.hidden_size) + attention
    assert t_tied.flops_per_token == 6 * t_tied.parameters + attention  # the tied matrix is the output matmul
    assert matmul_parameters(1000, 10, 20, tied=True) == 1000
    assert matmul_parameters(1000, 10, 20, tied=False) == 800


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
    files = BaseModelFiles(tmp_path / "out")
    result, baseline = build_base_model(small_corpus, token_files / "tok", files.folder, profile, progress=False)
    summary = json.loads(files.summary.read_text())
    assert summary["devices"] == 2
    assert result.steps == 2
    assert len(result.history) == 2
    assert result.tokens_seen == 2 * 2 * 32 * 2  # steps x micro_batch x seq_len x processes
    assert baseline == summary["unigram_bpb"] > 0
    assert (files.model / "model.safetensors").exists()
    # the processes read the profile written into the run folder, not the caller's file
    written = load_profile(files.profile)
    assert written.pretrain == profile.pretrain
    assert written.model == profile.model


def test_device_report_on_this_machine(capsys):
    from pipeline.cli import main

    assert main(["device"]) == 0
    report = json.loads(capsys.readouterr().out)
    if not torch.cuda.is_available():
        assert report["device"] == "cpu"
        assert report["pretrain_loss"] == "chunked"
        assert report["bitsandbytes_cuda"] is None
    else:  # the GPU this machine has, and what kiln will train it with
        from pipeline.train.loss import liger_installed

        assert report["device"] == torch.cuda.get_device_name()
        assert report["cuda_version"] == torch.version.cuda
        assert report["pretrain_loss"] == ("fused" if liger_installed() else "chunked")
        assert report["bf16"] == torch.cuda.is_bf16_supported()
        assert isinstance(report["bitsandbytes_cuda"], bool)


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
    assert err.startswith("kiln: error: a CUDA GPU is here but bitsandbytes has no CUDA build")
    assert err.count("\n") == 1


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
    assert torch.allclose(ours, stock, atol=1e-5)
    assert torch.allclose(ours, eager, atol=1e-4)
    # causal: a change to the last token moves only the last position's logits
    assert torch.allclose(ours[:, :-1], ours_changed[:, :-1])
    assert not torch.allclose(ours[:, -1], ours_changed[:, -1])
