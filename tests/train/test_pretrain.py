"""Pretraining a test-sized Llama: a few steps learn, resume is exact, sizes and errors are checked."""

import dataclasses

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from transformers import AutoModelForCausalLM, GenerationConfig

from pipeline.config import ModelShape, PretrainSettings, ProfileError, load_profile
from pipeline.data.clean import read_split
from pipeline.errors import KilnError
from pipeline.train.loss import ChunkedLinearCrossEntropy, linear_cross_entropy
from pipeline.train.pretrain import (
    PackedTokens,
    autocast_dtype,
    count_parameters,
    lr_at,
    pretrain,
    tokenize_to_file,
    unigram_bpb,
)
from pipeline.train.tokenizer import texts_of, token_byte_lengths, train_tokenizer

SHAPE = ModelShape(hidden_size=256, intermediate_size=256, num_layers=1, num_heads=4, num_kv_heads=2)
SETTINGS = PretrainSettings(
    seq_len=32, micro_batch=4, grad_accum=2, steps=6, lr=3e-3, warmup_steps=2, eval_every=3, eval_batches=2,
    checkpoint_every=2,
)  # fmt: skip


@pytest.fixture(scope="module")
def data(small_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    tok = train_tokenizer(texts_of(read_split(small_corpus, "train")), root / "tok", vocab_size=512, min_frequency=1)
    train = root / "train.bin"
    val = root / "val.bin"
    tokenize_to_file(texts_of(read_split(small_corpus, "train")), tok, train)
    tokenize_to_file(texts_of(read_split(small_corpus, "validation")), tok, val)
    return tok, train, val, token_byte_lengths(tok)


def test_token_file_and_packing(data):
    tok, train, _, _ = data
    packed = PackedTokens(train, seq_len=32, seed=0)
    assert packed.n == (len(packed.tokens) - 1) // 32
    x, y = packed.batch(0, 4)
    assert x.shape == y.shape == (4, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
    assert int(packed.tokens.max()) < len(tok)
    # the order is a pure function of (seed, k): a fresh reader gives the same samples
    assert torch.equal(PackedTokens(train, 32, 0).batch(5, 3)[0], packed.batch(5, 3)[0])
    assert tok.eos_token_id in packed.tokens  # documents are separated


def test_every_document_opens_with_bos_and_closes_with_eos(data, tmp_path):
    tok = data[0]
    texts = ["def f(x):\n    return x\n", "the model reads tokens"]
    n = tokenize_to_file(texts, tok, tmp_path / "two.bin")
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert bos != eos
    assert tok.convert_ids_to_tokens(bos) == "<|bos|>"
    expected = [bos, *ids[0], eos, bos, *ids[1], eos]  # as a chat sequence opens: <|bos|> first
    assert PackedTokens(tmp_path / "two.bin", 4).tokens.tolist() == expected
    assert n == len(expected)


def test_few_steps_learn_and_save_a_loadable_model(data, tmp_path):
    tok, train, val, tb = data
    settings = dataclasses.replace(SETTINGS, steps=30, eval_every=30, checkpoint_every=30)
    result = pretrain(train, val, tok, tb, tmp_path, SHAPE, settings, progress=False)
    assert result.history[-1]["loss"] < result.history[0]["loss"] - 1.0
    assert result.val_bpb < unigram_bpb(train, val, len(tok), tb)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tok)
    assert (tmp_path / "model" / "model.safetensors").exists()
    assert (tmp_path / "model" / "tokenizer.json").exists()
    # HF generation stops where llama.cpp does: at <|end|> (a chat turn's close) as well as <|eos|>
    stops = GenerationConfig.from_pretrained(tmp_path / "model").eos_token_id
    assert set(stops) == {tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")}


def test_resume_matches_an_uninterrupted_run(data, tmp_path):
    tok, train, val, tb = data
    straight = pretrain(train, val, tok, tb, tmp_path / "a", SHAPE, SETTINGS, progress=False)
    partial = pretrain(train, val, tok, tb, tmp_path / "b", SHAPE, SETTINGS, progress=False, stop_after=3)
    assert partial.steps == 3
    assert not (tmp_path / "b" / "model").exists()
    resumed = pretrain(train, val, tok, tb, tmp_path / "b", SHAPE, SETTINGS, progress=False)
    assert resumed.resumed_from == 3
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "model").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "model").state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_corpus_too_small_and_vocab_mismatch(data, tmp_path):
    tok, train, val, tb = data
    big = dataclasses.replace(SETTINGS, micro_batch=100_000)
    with pytest.raises(KilnError, match="one step needs 200000"):
        pretrain(train, val, tok, tb, tmp_path, SHAPE, big, progress=False)
    small_vocab = train_tokenizer(["abc abd abe"] * 10, tmp_path / "t2", vocab_size=270, min_frequency=1)
    with pytest.raises(KilnError, match="token files and tokenizer differ"):
        pretrain(train, val, small_vocab, tb, tmp_path, SHAPE, SETTINGS, progress=False)


def test_shape_errors_name_the_setting():
    with pytest.raises(ProfileError, match="hidden_size 300 is not a multiple of 256"):
        ModelShape(hidden_size=300)
    with pytest.raises(ProfileError, match="num_heads 4 does not divide by num_kv_heads 3"):
        ModelShape(num_kv_heads=3)
    with pytest.raises(ProfileError, match="does not divide by num_heads"):
        ModelShape(hidden_size=512, num_heads=6, num_kv_heads=2)


def test_300m_profile_fits_the_budget():
    n = count_parameters(load_profile("300m").model)  # built on the meta device: no memory spent
    assert 200_000_000 <= n <= 300_000_000
    assert count_parameters(load_profile("tiny").model) < 20_000_000


def test_schedule_warms_up_then_decays_to_its_minimum_at_the_last_step():
    s = PretrainSettings(steps=101, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, s) == pytest.approx(0.1)
    assert lr_at(9, s) == pytest.approx(1.0)
    assert lr_at(10, s) == pytest.approx(1.0)  # the decay starts from the peak
    assert lr_at(55, s) == pytest.approx(0.55)  # halfway down the cosine
    assert lr_at(s.steps - 1, s) == pytest.approx(0.1)  # the last step that runs
    lrs = [lr_at(i, s) for i in range(10, s.steps)]
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))


def test_the_logged_learning_rate_is_the_one_each_step_used(data, tmp_path):
    tok, train, val, tb = data
    used = []
    hook = register_optimizer_step_pre_hook(lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    try:
        result = pretrain(train, val, tok, tb, tmp_path, SHAPE, SETTINGS, progress=False)
    finally:
        hook.remove()
    assert len(used) == SETTINGS.steps
    assert [row["lr"] for row in result.history] == pytest.approx(used)
    assert used == pytest.approx([lr_at(i, SETTINGS) for i in range(SETTINGS.steps)])
    assert used[-1] == pytest.approx(SETTINGS.lr * SETTINGS.min_lr_ratio)


def test_chunked_cross_entropy_matches_autograd():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    ref = torch.nn.functional.cross_entropy(hidden @ weight.T, targets)
    ref.backward()
    ref_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    loss = ChunkedLinearCrossEntropy.apply(hidden, weight, targets, 8)  # 8 does not divide 37
    (loss * 2).backward()  # an outer factor flows through
    assert torch.allclose(loss, ref, atol=1e-6)
    assert torch.allclose(hidden.grad, 2 * ref_grads[0], atol=1e-6)
    assert torch.allclose(weight.grad, 2 * ref_grads[1], atol=1e-6)


def test_chunked_cross_entropy_under_bf16_autocast_matches_autograd_in_bf16():
    """Training's path on a bf16 device: fp32 master weights, bf16 compute, fp32 weight gradient."""
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    ref = torch.nn.functional.cross_entropy((hidden.bfloat16() @ weight.bfloat16().T).float(), targets)
    ref.backward()
    ref_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    _, loss_fn = linear_cross_entropy("cpu", torch.bfloat16, chunk=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(hidden, weight, targets)
    loss.backward()
    assert loss.dtype == torch.float32
    assert weight.grad.dtype == torch.float32
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-3, atol=1e-3)
    scale = ref_grads[0].abs().max().item()
    torch.testing.assert_close(hidden.grad, ref_grads[0], rtol=2e-2, atol=2e-2 * scale)
    scale = ref_grads[1].abs().max().item()
    torch.testing.assert_close(weight.grad, ref_grads[1], rtol=2e-2, atol=2e-2 * scale)


def test_auto_precision_is_bf16_where_the_cpu_multiplies_bf16_natively(monkeypatch):
    # which CPU this is cannot be chosen here: its two bf16 capabilities are set both ways
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    for native in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda native=native: native)
        assert autocast_dtype(PretrainSettings(precision="auto"), cpu) == (torch.bfloat16 if native else None)
        assert autocast_dtype(PretrainSettings(precision="fp32"), cpu) is None
    with pytest.raises(KilnError, match="pretrain.precision is bf16 but this cpu has no native bf16"):
        autocast_dtype(PretrainSettings(precision="bf16"), cpu)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert autocast_dtype(PretrainSettings(precision="bf16"), cpu) == torch.bfloat16
