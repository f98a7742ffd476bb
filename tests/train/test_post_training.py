"""Post-training: the mined and user datasets, QLoRA SFT on 4-bit weights, DPO, merging."""

import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from pipeline.config import DPOSettings, ProfileError, SFTSettings
from pipeline.data.clean import read_split
from pipeline.data.negatives import corruptions
from pipeline.data.post_data import (
    build_post_data,
    dpo_records,
    encode_pair,
    held_for_post_training,
    mine_functions,
    pair_check,
)
from pipeline.errors import KilnError
from pipeline.io import read_json, read_jsonl
from pipeline.train.dpo import answer_logps, held_out_preference, make_dpo_trainer, train_dpo
from pipeline.train.lora import load_for_training
from pipeline.train.sft import completion_loss, count_4bit, make_sft_trainer, train_sft
from pipeline.train.tokenizer import chat_token_ids

CODE = '''
import os


def join_all(parts, sep=","):
    """Join the parts with a separator, skipping empty ones."""
    kept = [p for p in parts if p]
    return sep.join(kept)


def no_doc(x):
    return x


def short(x):
    """Too short a body to teach anything."""
    return x
'''

SFT = SFTSettings(steps=4, batch=2, lr=5e-3, max_pairs=40, lora_r=4, lora_alpha=8, max_length=256)


def test_mine_functions_from_code():
    found = list(mine_functions(CODE))
    assert [f.signature for f in found] == ['def join_all(parts, sep=","):']
    fn = found[0]
    assert "Join the parts with a separator" in fn.request
    assert fn.request.startswith("Write a Python function")
    assert fn.answer.startswith("def join_all")
    assert "return sep.join(kept)" in fn.answer
    assert fn.body.strip().startswith("kept =")


def test_corruptions_change_one_point_of_the_function():
    source = (
        "def pick(items, limit=3):\n"
        '    """Items below the limit, or all when there are few."""\n'
        "    if len(items) < limit and items:\n"
        "        return list(items)\n"
        "    return sorted(items, key=abs)[:limit]\n"
    )
    found = {c.kind: c.text for c in corruptions(source)}
    assert "    if len(items) >= limit and items:\n" in found["flipped_comparison"]
    assert "    if len(items) < limit or items:\n" in found["flipped_boolean"]
    assert found["returns_none"].count("return None") == 1
    assert "def pick(items, limit=3):" in found["flipped_comparison"]  # the signature's default is not touched
    for text in found.values():
        assert text != source
        assert text.splitlines()[:2] == source.splitlines()[:2]
    assert corruptions('def f(x):\n    """Doc."""\n    pass\n') == []  # nothing to corrupt


def test_preference_pairs_reject_a_corrupted_copy_never_another_body(small_corpus):
    from pipeline.data.post_data import mine_from_corpus

    functions = mine_from_corpus(read_split(small_corpus, "train"), 20)
    results = list(dpo_records(functions))
    pairs = [(fn, row) for fn, row, _ in results if isinstance(row, dict)]
    assert len(pairs) == len(functions) == 20  # every mined function here has a corruption point
    for fn, row in pairs:
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert chosen == fn.answer
        assert rejected != chosen
        assert row["prompt"][0]["role"] == "user"
        assert row["chosen"][0]["role"] == "assistant"
        # one edit: what differs lies between a shared start and a shared end
        start = next(i for i, (a, b) in enumerate(zip(chosen, rejected, strict=False)) if a != b)
        end = next(i for i, (a, b) in enumerate(zip(chosen[::-1], rejected[::-1], strict=False)) if a != b)
        assert len(chosen) - start - end < 12
        assert not any(other.body in rejected for other in functions if other is not fn)


MULTI = '''
def first_{i}(xs):
    """Sum of the positive items."""
    total = 0
    for x in xs:
        if x > {i}:
            total += x
    return total


def second_{i}(a, b):
    """The larger of two values."""
    if a >= b:
        return a
    return max(b, a + {i})
'''


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_no_source_file_feeds_both_splits(kind, tmp_path):
    # ingest cuts a long file into parts: doc{i} and doc{i}#1 are one file
    records = [{"id": f"doc{i // 2}" + ("#1" if i % 2 else ""), "text": MULTI.format(i=i), "lang": "python"}
               for i in range(40)]  # fmt: skip
    stats = build_post_data(kind, records, [], tmp_path / kind, 1000, 0.2)
    split = read_json(tmp_path / kind / "split.json")
    assert split["eval_sources"]
    assert not set(split["eval_sources"]) & set(split["train_sources"])
    answer = "completion" if kind == "sft" else "chosen"
    source_of = {f.answer: r["id"].split("#")[0] for r in records for f in mine_functions(r["text"])}
    for part, sources in (("train", split["train_sources"]), ("eval", split["eval_sources"])):
        rows = list(read_jsonl(tmp_path / kind / f"{part}.jsonl"))
        assert {source_of[r[answer][0]["content"]] for r in rows} == set(sources)
    assert stats.train + stats.eval == 80
    assert stats.eval % 4 == 0


def test_validation_documents_never_feed_the_sets(small_corpus, tmp_path):
    build_post_data("sft", read_split(small_corpus, "train"), [], tmp_path / "sft", 1000, 0.1)
    val_answers = {f.answer for r in read_split(small_corpus, "validation") for f in mine_functions(r["text"])}
    rows = [
        json.loads(line)
        for f in ("train.jsonl", "eval.jsonl")
        for line in (tmp_path / "sft" / f).read_text().splitlines()
    ]
    assert rows
    assert not {r["completion"][0]["content"] for r in rows} & val_answers


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_held_out_rows_come_from_reserved_validation_files_unseen_in_pretraining(kind, tmp_path):
    """Held-out rows mined from the train split were seen verbatim in pretraining. They come from
    validation files that held_for_post_training reserves (the others feed kiln's lm-eval tasks),
    less any function a train document holds too."""
    train = [{"id": f"python_stdlib:t{i}.py", "text": MULTI.format(i=i), "lang": "python"} for i in range(30)]
    validation = [
        {"id": f"python_stdlib:v{i}.py", "text": MULTI.format(i=100 + i), "lang": "python"} for i in range(40)
    ] + [{"id": "python_stdlib:copy.py", "text": MULTI.format(i=3), "lang": "python"}]  # also in train (t3)
    reserved = [r for r in validation if held_for_post_training(r["id"])]
    assert 0 < len(reserved) < len(validation)
    stats = build_post_data(kind, train, [], tmp_path / kind, 40, 0.2, clean_validation=validation)
    answer = "completion" if kind == "sft" else "chosen"
    held = {r[answer][0]["content"] for r in read_jsonl(tmp_path / kind / "eval.jsonl")}
    in_train = {f.answer for r in train for f in mine_functions(r["text"])}
    in_reserved = {f.answer for r in reserved for f in mine_functions(r["text"])}
    assert held
    assert held <= in_reserved
    assert not held & in_train
    assert stats.eval == len(held) == 10  # eval_share 0.2 of all rows: 10 beside 40
    assert stats.held_out_from.startswith("validation split")
    trained = {r[answer][0]["content"] for r in read_jsonl(tmp_path / kind / "train.jsonl")}
    assert trained <= in_train


def test_bad_user_rows_are_rejected_with_file_and_line(tmp_path):
    sft = tmp_path / "sft.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    sft.write_text(
        "\n".join(
            [
                json.dumps(good),
                json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),
                json.dumps({"messages": "not a list"}),
                "{broken",
                json.dumps(good | {"messages": [{"role": "wizard", "content": "x"}, good["messages"][1]]}),
            ]
        )
        + "\n"
    )
    stats = build_post_data("sft", [], [str(sft)], tmp_path / "out", 10, 0.1)
    assert stats.train + stats.eval == 1
    assert stats.rejected == {
        "the last message is not the assistant's": 1,
        "messages is not a non-empty list": 1,
        "malformed_json": 1,
        "a message lacks a role or a string content": 1,
    }
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert rejected[0]["where"] == f"{sft}:2"

    dpo = tmp_path / "dpo.jsonl"
    dpo.write_text(json.dumps({"prompt": "q", "chosen": "", "rejected": "no"}) + "\n")
    with pytest.raises(KilnError, match="no usable dpo rows .*empty chosen"):
        build_post_data("dpo", [], [str(dpo)], tmp_path / "out2", 10, 0.1)
    assert not (tmp_path / "out2").exists()


def _pair(prompt: str, chosen: str, rejected: str) -> str:
    return json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected})


def test_pairs_that_cannot_teach_within_the_length_are_dropped_and_counted(tiny_base, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    shared = "def f(x):\n" + "    x = x + 1\n" * 30  # far past 64 tokens
    dpo = tmp_path / "dpo.jsonl"
    dpo.write_text(
        "\n".join(
            [
                _pair("Add one.", "def f(x):\n    return x + 1\n", "def f(x):\n    return x - 1\n"),
                _pair("Same answers.", "def f(x):\n    return x\n", "def f(x):\n    return x\n"),
                _pair("Differs late.", shared + "    return x\n", shared + "    return None\n"),
                _pair("word " * 100, "def f(x):\n    return x\n", "def f(x):\n    return 0\n"),
                _pair("Double.", "def g(x):\n    return 2 * x\n", "def g(x):\n    return 3 * x\n"),
            ]
        )
        + "\n"
    )
    check = pair_check(tok, 64)
    stats = build_post_data("dpo", [], [str(dpo)], tmp_path / "out", 10, 0.1, check=check)
    assert stats.rejected == {"identical_within_max_length": 2, "prompt_fills_max_length": 1}
    assert stats.train + stats.eval == 2
    assert stats.sources == {str(dpo): 2}
    dropped = list(read_jsonl(tmp_path / "out" / "rejected.jsonl"))
    assert [d["where"] for d in dropped] == [f"{dpo}:2", f"{dpo}:3", f"{dpo}:4"]
    # the same pair counts when the length reaches its difference
    late = json.loads(dpo.read_text().splitlines()[2])
    row = {"prompt": [{"role": "user", "content": late["prompt"]}]}
    row |= {k: [{"role": "assistant", "content": late[k]}] for k in ("chosen", "rejected")}
    assert check(row) == "identical_within_max_length"
    assert pair_check(tok, 256)(row) is None


def test_mined_pairs_differ_within_the_trained_length(tiny_base, small_corpus, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    stats = build_post_data(
        "dpo", read_split(small_corpus, "train"), [], tmp_path / "d", 30, 0.1, check=pair_check(tok, 76)
    )
    rows = [*read_jsonl(tmp_path / "d" / "train.jsonl"), *read_jsonl(tmp_path / "d" / "eval.jsonl")]
    assert len(rows) == stats.train + stats.eval == 30
    assert sum(stats.corruption_kinds.values()) == 30
    for row in rows:
        prompt, chosen, rejected = encode_pair(tok, row)
        room = 76 - len(prompt)
        assert room > 0
        assert chosen[:room] != rejected[:room]
    # at 76 tokens some functions have no corruption early enough: dropped, and counted
    assert stats.rejected.get("identical_within_max_length", 0) > 0
    assert len(list(read_jsonl(tmp_path / "d" / "rejected.jsonl"))) == sum(stats.rejected.values())


def _dpo_rows() -> list[dict]:
    def row(prompt, chosen, rejected):
        user, bot = [{"role": "user", "content": prompt}], lambda c: [{"role": "assistant", "content": c}]
        return {"prompt": user, "chosen": bot(chosen), "rejected": bot(rejected)}

    return [
        row("Add one.", "def f(x):\n    return x + 1\n", "def f(x):\n    return x - 1\n"),
        row("Double.", "def g(x):\n    return 2 * x\n", "def g(x):\n    return None\n"),
        row("Long.", "def h(x):\n" + "    x = x * 3\n" * 20, "def h(x):\n" + "    x = x + 3\n" * 20),
    ]


def test_answer_log_probabilities_match_trl(tiny_base, tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok, rows, max_length = AutoTokenizer.from_pretrained(tiny_base), _dpo_rows(), 48  # the long pair is cut
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    args = DPOConfig(
        output_dir=str(tmp_path), per_device_eval_batch_size=len(rows), max_length=max_length,
        report_to="none", use_cpu=True,
    )  # fmt: skip
    data = Dataset.from_list(rows)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, eval_dataset=data, processing_class=tok)
    trl = trainer.evaluate()
    ours = answer_logps(model, tok, rows, max_length)
    assert sum(c for c, _ in ours) / 3 == pytest.approx(trl["eval_logps/chosen"], rel=1e-4)
    assert sum(r for _, r in ours) / 3 == pytest.approx(trl["eval_logps/rejected"], rel=1e-4)

    pref = held_out_preference(tiny_base, rows, max_length)
    assert pref.pairs == 3
    assert pref.accuracy == sum(c > r for c, r in ours) / 3
    assert pref.margin == pytest.approx(sum(c - r for c, r in ours) / 3, abs=1e-4)
    swapped = [r | {"chosen": r["rejected"], "rejected": r["chosen"]} for r in rows]
    flipped = held_out_preference(tiny_base, swapped, max_length)
    assert flipped.accuracy == pytest.approx(1 - pref.accuracy)
    assert flipped.margin == pytest.approx(-pref.margin, abs=1e-4)


@pytest.fixture(scope="module")
def sft_data(small_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("sftdata") / "sft"
    build_post_data("sft", read_split(small_corpus, "train"), [], out, 40, 0.1)
    return out


def test_sft_trains_4bit_layers_with_masked_prompt(tiny_base, sft_data, tmp_path):
    import bitsandbytes as bnb

    history: list = []
    trainer, tokenizer, _ = make_sft_trainer(tiny_base, sft_data, tmp_path, SFT, history)
    projections = [
        m for n, m in trainer.model.named_modules() if n.endswith(("q_proj.base_layer", "down_proj.base_layer"))
    ]
    assert projections
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in projections)
    assert count_4bit(trainer.model) == 7  # every projection of the one layer
    example = trainer.train_dataset[0]
    batch = trainer.data_collator([example])
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    row = json.loads((sft_data / "train.jsonl").read_text().splitlines()[0])
    prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert (labels[:n_prompt] == -100).all()  # the prompt does not count
    assert (labels[n_prompt:] == ids[n_prompt:]).all()  # the completion does


def assert_trl_called_the_head(trainer, cpu_head: bool) -> None:
    """Equal losses prove nothing if TRL no longer asks for the fused head: then both runs used TRL's
    own path. Count the CPU head's calls in the step just taken."""
    import trl

    calls = getattr(trainer.model.get_base_model(), "kiln_head_calls", 0)
    assert (calls > 0) == cpu_head, (
        f"TRL {trl.__version__} called kiln's CPU head {calls} times in one training step: it no longer asks the "
        "model for per-token log-probs with fused_lm_head=True; install the locked TRL (make lock pins it) or "
        "update pipeline/train/lora.py score_completions_only"
    )


def test_cpu_head_trains_what_trls_head_trains_in_sft(tiny_base, sft_data, tmp_path):
    """The same CPU head under SFTTrainer (NF4 base, LoRA, trainable chat-token rows behind peft's
    wrapper of the tied output layer): TRL's loss, gradients and logged figures on the same batch."""
    runs = {}
    for cpu_head in (False, True):
        torch.manual_seed(0)
        trainer = make_sft_trainer(tiny_base, sft_data, tmp_path / str(cpu_head), SFT, [], cpu_head=cpu_head)[0]
        head = trainer.model.get_base_model().forward.__func__.__qualname__
        assert head.startswith("score_completions_only") == cpu_head  # the two runs compare two heads
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this bypasses
        batch = next(iter(trainer.get_train_dataloader()))
        assert (batch["labels"] == -100).any()  # prompts not scored
        loss = trainer.training_step(trainer.model, batch).item()
        assert_trl_called_the_head(trainer, cpu_head)
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        runs[cpu_head] = loss, grads, {k: v[-1] for k, v in trainer._metrics["train"].items()}
    (loss_trl, grads_trl, figs_trl), (loss_cpu, grads_cpu, figs_cpu) = runs[False], runs[True]
    assert loss_cpu == pytest.approx(loss_trl, rel=1e-5)
    assert any("trainable_tokens" in n for n in grads_trl)
    assert grads_cpu.keys() == grads_trl.keys()
    for name, grad in grads_trl.items():
        # atol scaled to the gradient: float32 sums in another order differ by ~2e-6 where the largest is 2e-2
        torch.testing.assert_close(grads_cpu[name], grad, rtol=1e-4, atol=1e-3 * grad.abs().max().item())
    assert any(g.abs().max() > 0 for g in grads_trl.values())
    for key in ("entropy", "mean_token_accuracy", "num_tokens"):
        assert figs_cpu[key] == pytest.approx(figs_trl[key], rel=1e-4, abs=1e-5), key


@pytest.fixture(scope="module")
def sft_run(tiny_base, sft_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    return train_sft(tiny_base, sft_data, out, SFT), out


CHAT_TOKENS = ["<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def test_sft_merges_into_a_loadable_checkpoint(tiny_base, sft_run):
    result, out = sft_run
    assert result.quantized_modules == 7
    assert 0 < result.trainable < result.total * 0.5
    assert result.eval_loss_after < result.eval_loss_before  # the merged model beats the full-precision base
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    assert not any(type(m).__name__.startswith(("Lora", "TrainableTokens")) for m in merged.modules())
    w_merged = merged.model.layers[0].self_attn.q_proj.weight
    assert w_merged.dtype == torch.float32
    assert not torch.equal(w_merged, base.model.layers[0].self_attn.q_proj.weight)  # the adapter was merged in


def test_sft_trains_exactly_the_chat_token_rows_and_the_merged_model_holds_them(tiny_base, sft_run):
    result, out = sft_run
    tok = AutoTokenizer.from_pretrained(out / "model")
    chat = tok.convert_tokens_to_ids(CHAT_TOKENS)
    assert chat_token_ids(tok) == sorted(chat)
    assert sorted(result.trainable_tokens) == sorted(CHAT_TOKENS)
    base = AutoModelForCausalLM.from_pretrained(tiny_base).get_input_embeddings().weight
    merged_model = AutoModelForCausalLM.from_pretrained(out / "model")
    merged = merged_model.get_input_embeddings().weight
    changed = (merged != base).any(dim=1).nonzero().flatten().tolist()
    # Tied embeddings: each chat row also scores its token as output, so all five get gradient
    # (<|system|> too, absent from the rows); every other row (ordinary text tokens) stays frozen.
    assert base.shape == merged.shape
    assert changed == sorted(chat)
    assert merged_model.config.tie_word_embeddings
    assert torch.equal(merged_model.lm_head.weight, merged)
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:  # the adapter stores the rows
        assert any("trainable_tokens" in key for key in f.keys())  # noqa: SIM118 (safe_open is no mapping)


def test_merged_model_agrees_with_the_adapter_within_the_nf4_error(tiny_base, sft_run, sft_data):
    """The adapter (NF4 base + LoRA + trained rows) and the merged model (full-precision base + the
    same weights) differ only by NF4's rounding of the base's projections. To first order that is
    the same weight perturbation that separates the NF4 base from the full-precision base, so the
    two gaps are alike; the bound allows twice the base's gap plus 0.02 nats for higher-order terms."""
    result, out = sft_run
    tok = AutoTokenizer.from_pretrained(out / "model")
    held = [json.loads(line) for line in (sft_data / "eval.jsonl").read_text().splitlines()]
    nf4_base = completion_loss(load_for_training(tiny_base, quantize=True), tok, held)
    base_gap = abs(nf4_base - result.eval_loss_before)
    assert base_gap > 0  # the quantization is real
    assert abs(result.eval_loss_after - result.eval_loss_adapter) <= 2 * base_gap + 0.02
    # ... and far smaller than what training changed
    assert abs(result.eval_loss_after - result.eval_loss_adapter) < (result.eval_loss_before - result.eval_loss_after)


def test_hf_generation_stops_at_end_of_turn(sft_run):
    _, out = sft_run
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    end, eos = tok.convert_tokens_to_ids("<|end|>"), tok.eos_token_id
    assert set(model.generation_config.eos_token_id) == {end, eos}
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    # A model that has learnt to close its turn: <|end|> made the likeliest token at every step.
    closing = {"sequence_bias": {(end,): 100.0}, "max_new_tokens": 6, "do_sample": False}
    assert model.generate(ids, **closing)[0, ids.shape[1] :].tolist() == [end]  # stops right after it
    run_on = model.generate(ids, eos_token_id=eos, **closing)[0, ids.shape[1] :].tolist()
    assert run_on == [end] * 6  # stopping at <|eos|> only, it would run on to max_new_tokens


def test_chat_tokens_of_a_downloaded_tokenizer():
    from hub_models import byte_level_tokenizer, sample_texts

    from pipeline.train.pretrained import PLAIN_CHAT_TEMPLATE

    tok = byte_level_tokenizer(sample_texts(40))
    tok.chat_template = PLAIN_CHAT_TEMPLATE  # kiln's turns closed by the model's own eos
    assert chat_token_ids(tok) == [tok.eos_token_id]
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endfor %}"
    assert chat_token_ids(tok) == sorted(tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]))
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    assert chat_token_ids(tok) == []  # nothing to train: SFT trains the adapters only


def test_dpo_raises_the_margin_on_its_own_pairs(tiny_base, small_corpus, tmp_path):
    data = tmp_path / "dpo"
    build_post_data("dpo", read_split(small_corpus, "train"), [], data, 8, 0.1)
    shutil.copy(data / "train.jsonl", data / "eval.jsonl")  # measure on the pairs it trains on
    settings = DPOSettings(steps=8, batch=4, lr=5e-3, beta=0.1, lora_r=4, lora_alpha=8, max_length=256)
    result = train_dpo(tiny_base, data, tmp_path / "out", settings)
    held = list(read_jsonl(data / "eval.jsonl"))
    assert result.before == held_out_preference(tiny_base, held, 256)  # before: the starting checkpoint itself
    assert result.after == held_out_preference(tmp_path / "out" / "model", held, 256)  # after: the shipped model
    assert result.after.margin > result.before.margin
    assert result.after.accuracy >= result.before.accuracy
    assert result.reward_margin > 0.0
    # TRL's reward margin is beta x the change of the mean log-prob margin; its loss falls below log 2
    assert result.reward_margin == pytest.approx(0.1 * (result.after.margin - result.before.margin), rel=1e-6)
    assert result.eval_loss_after < math.log(2)  # below DPO's loss at the start, where policy = reference
    assert not result.eval_loss_before_measured  # log 2 is the theoretical start, named as such, not a measurement
    tok = AutoTokenizer.from_pretrained(tmp_path / "out" / "model")
    stops = GenerationConfig.from_pretrained(tmp_path / "out" / "model").eos_token_id
    assert set(stops) == {tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")}  # ends a turn as SFT's does


def test_cpu_head_trains_what_trls_head_trains(tiny_base, small_corpus, tmp_path):
    """score_completions_only (the CPU DPO head) gives TRL's loss, LoRA gradients and logged figures on the
    same batch: it is faster, not different (benchmarks/tune_step.py measures by how much)."""
    data = tmp_path / "dpo"
    build_post_data("dpo", read_split(small_corpus, "train"), [], data, 8, 0.1)
    settings = DPOSettings(steps=2, batch=4, lora_r=4, lora_alpha=8, max_length=96)  # 96: some pairs are cut
    runs = {}
    for cpu_head in (False, True):
        torch.manual_seed(0)
        trainer = make_dpo_trainer(tiny_base, data, tmp_path / str(cpu_head), settings, cpu_head=cpu_head)[0]
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this bypasses
        batch = next(iter(trainer.get_train_dataloader()))
        assert batch["completion_mask"].sum() < batch["attention_mask"].sum()  # prompts (and padding) not scored
        loss = trainer.training_step(trainer.model, batch).item()
        assert_trl_called_the_head(trainer, cpu_head)
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        figures = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        runs[cpu_head] = loss, grads, figures
    (loss_trl, grads_trl, figs_trl), (loss_cpu, grads_cpu, figs_cpu) = runs[False], runs[True]
    assert loss_cpu == pytest.approx(loss_trl, abs=1e-5)
    assert grads_cpu.keys() == grads_trl.keys()
    assert len(grads_cpu) > 0
    for name, grad in grads_trl.items():
        # atol scaled to the gradient: float32 sums in another order differ by ~2e-6 where the largest is 2e-2
        torch.testing.assert_close(grads_cpu[name], grad, rtol=1e-4, atol=1e-3 * grad.abs().max().item())
    assert any(g.abs().max() > 0 for g in grads_trl.values())  # a zero step would compare nothing
    assert figs_cpu.keys() == figs_trl.keys()
    for key in ("logps/chosen", "logps/rejected", "entropy", "logits/chosen", "mean_token_accuracy", "num_tokens"):
        assert figs_cpu[key] == pytest.approx(figs_trl[key], rel=1e-4, abs=1e-5), key


def test_dpo_sft_weight_adds_the_chosen_answers_nll(tiny_base, small_corpus, tmp_path):
    """dpo.sft_weight w: the loss is DPO's plus w times the mean negative log-likelihood of the
    chosen answers' tokens, computed here apart from the trainer on the same batch."""
    data = tmp_path / "dpo"
    build_post_data("dpo", read_split(small_corpus, "train"), [], data, 8, 0.1)
    losses = {}
    for w in (0.0, 2.0):
        settings = DPOSettings(steps=2, batch=4, lora_r=4, lora_alpha=8, max_length=96, sft_weight=w)
        trainer = make_dpo_trainer(tiny_base, data, tmp_path / str(w), settings)[0]
        trainer.model.eval()
        trainer.current_gradient_accumulation_steps = 1
        batch = next(iter(trainer.get_train_dataloader()))
        with torch.no_grad():
            losses[w] = trainer.compute_loss(trainer.model, batch).item()
            half = len(batch["input_ids"]) // 2  # the chosen rows, then the rejected ones
            ids, attention = batch["input_ids"][:half], batch["attention_mask"][:half]
            logits = trainer.model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(2, ids[:, 1:, None])[..., 0]
        nll = -logp[batch["completion_mask"][:half, 1:].bool()].mean().item()
    assert losses[0.0] == pytest.approx(math.log(2), abs=1e-5)  # the policy is the reference at the start
    assert losses[2.0] == pytest.approx(losses[0.0] + 2.0 * nll, rel=1e-4)
    with pytest.raises(ProfileError, match="dpo.sft_weight must be 0 or more"):
        DPOSettings(sft_weight=-1)


def test_peak_memory_is_the_stages_own_not_the_process_high_water_mark():
    """SFT and DPO run in the process that pretrained: ru_maxrss would report pretraining's peak.
    reset_peak_memory starts the stage's own, so a large buffer freed before it is not counted."""
    import numpy as np

    from pipeline.train.lora import peak_memory_mb, reset_peak_memory

    if torch.cuda.is_available():
        pytest.skip("on a GPU the peak is the CUDA allocator's, reset by torch itself")
    big = np.ones(400 * 2**20 // 8)  # 400 MB, touched
    with_big = peak_memory_mb()
    del big  # numpy's large buffers are unmapped when freed
    reset_peak_memory()
    assert peak_memory_mb() < with_big - 300
    again = np.ones(400 * 2**20 // 8)
    assert peak_memory_mb() >= with_big - 50  # a stage's own large buffer is counted
    del again
