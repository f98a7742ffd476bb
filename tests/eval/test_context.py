"""One context: the model declares the length it trained at, and nothing downstream (lm-eval,
HumanEval, bits per byte, the GGUF and its benchmark, serving, SFT/DPO) feeds it more positions.

`tiny_base` (conftest) trains at 256 tokens."""

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer, LlamaForCausalLM

from pipeline.cli import main
from pipeline.config import ProfileError, load_profile
from pipeline.errors import KilnError
from pipeline.eval.evaluation import bits_per_byte, lm_eval_scores, task_manager
from pipeline.eval.humaneval import _prompt_ids, generate, problems, task_ids
from pipeline.eval.lm_tasks import write_kiln_tasks
from pipeline.io import model_context, read_json, within_context
from pipeline.release.gguf_bench import declared_context, load, measure_speed, memory_contexts, speed_lengths

TRAINED = 256  # conftest's tiny_base: PretrainSettings(seq_len=256)


@pytest.fixture
def fed_lengths(monkeypatch) -> list[int]:
    """The sequence length of every forward pass of any Llama model loaded after this point."""
    lengths: list[int] = []
    forward = LlamaForCausalLM.forward

    def spy(self, input_ids=None, *args, **kwargs):
        lengths.append(input_ids.shape[-1])
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "forward", spy)
    return lengths


def test_the_model_declares_the_context_it_trained_at(tiny_base):
    assert read_json(tiny_base / "config.json")["max_position_embeddings"] == TRAINED
    assert read_json(tiny_base.parent / "metrics.json")["context_length"] == TRAINED
    assert model_context(tiny_base) == TRAINED


def test_the_gguf_declares_the_trained_context(ggufs):
    for path in ggufs.values():
        assert declared_context(path) == TRAINED
    llm = load(ggufs["Q4_K_M"])  # llama.cpp's context by default: the declared one
    try:
        assert llm.n_ctx() == TRAINED
    finally:
        llm.close()


def _long_functions(n: int = 8) -> list[dict]:
    """Held-out code whose bodies run past the trained context: lm-eval requests longer than it."""
    rows = []
    for i in range(n):
        lines = (f"    value_{j} = value_{j - 1} * {i + j} + {j * 7} - len(str(value_{j - 1}))" for j in range(1, 60))
        body = "\n".join(lines)
        text = f'def long_{i}(value_0):\n    """Fold step {i} of a long computation."""\n{body}\n    return value_59\n'
        rows.append({"id": f"long{i}", "text": text, "lang": "python", "split": "validation"})
    return rows


def test_lm_eval_never_feeds_more_positions_than_trained(tiny_base, tmp_path, fed_lengths):
    written, _, _ = write_kiln_tasks(_long_functions(2), tmp_path / "tasks", limit=6)
    assert written["kiln_next_line"] == 6  # 12 lines of context: several hundred tokens each
    scores = lm_eval_scores(tiny_base, task_manager(tmp_path / "tasks", []), ["kiln_next_line"], 6, 4)
    assert scores["kiln_next_line"]["n"] == 6
    assert fed_lengths
    assert max(fed_lengths) == TRAINED


def test_bits_per_byte_windows_stay_within_the_trained_context(tiny_base, fed_lengths):
    texts = [r["text"] for r in _long_functions(2)]
    asked_longer = bits_per_byte(tiny_base, texts, batch_size=2, window=4 * TRAINED)
    assert max(fed_lengths) == TRAINED
    assert asked_longer == bits_per_byte(tiny_base, texts, batch_size=2, window=TRAINED)


def test_humaneval_prompt_and_completion_fit_the_trained_context(tiny_base, ggufs, monkeypatch):

    new_tokens, ids = 200, task_ids(3)
    room = TRAINED - new_tokens
    asked = []
    hf_generate = LlamaForCausalLM.generate

    def spy_generate(self, input_ids=None, **kwargs):
        asked.append(input_ids.shape[-1] + kwargs["max_new_tokens"])
        return hf_generate(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "generate", spy_generate)
    rows = generate(tiny_base, ids, max_new_tokens=new_tokens, progress=False)
    assert asked
    assert max(asked) <= TRAINED
    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    for row in rows:  # every prompt is longer than the room left: each says how much was cut
        whole = len(_prompt_ids(tok, problems()[row["task_id"]]["prompt"]))
        assert row["prompt_tokens_cut"] == whole - room > 0

    fed = _positions_asked(monkeypatch)
    from_gguf = generate(ggufs["Q4_K_M"], ids, max_new_tokens=new_tokens, progress=False)
    assert fed
    assert max(fed) == TRAINED
    assert all(r["prompt_tokens_cut"] > 0 for r in from_gguf)


def test_humaneval_refuses_a_completion_as_long_as_the_context(tiny_base):
    with pytest.raises(KilnError, match=f"max_new_tokens {TRAINED} leaves no room .* {TRAINED}-token context"):
        generate(tiny_base, task_ids(1), max_new_tokens=TRAINED, progress=False)


def test_post_training_lengths_follow_or_are_refused_by_the_context(tiny_base):
    assert within_context(None, tiny_base, "sft.max_length") == TRAINED
    assert within_context(64, tiny_base, "sft.max_length") == 64
    with pytest.raises(KilnError, match=f"dpo.max_length 512 exceeds the {TRAINED}-token context"):
        within_context(512, tiny_base, "dpo.max_length")


def test_the_benchmark_measures_within_the_trained_context(ggufs):
    assert speed_lengths(4096) == (512, 128)  # llama-bench's own pp512/tg128 where they fit
    assert speed_lengths(128) == (128, 111)
    assert memory_contexts(4096, quick=False) == [512, 1024, 2048]
    assert memory_contexts(TRAINED, quick=False) == [TRAINED]
    llm = load(ggufs["Q4_K_M"])
    try:
        speed = measure_speed(llm, list(range(5, 40)), repeats=1, requests=2)
    finally:
        llm.close()
    assert (speed["pp_tokens"], speed["tg_tokens"]) == (TRAINED, 128)


def test_serving_slots_are_capped_at_the_trained_context(ggufs):
    from pipeline.presets import load_presets
    from pipeline.serve.metrics import Metrics
    from pipeline.serve.replicas import Pool
    from pipeline.serve.settings import load_settings
    from pipeline.serve.source import ModelSource

    presets = load_presets()
    assert max(p.context_size for p in presets.values()) > TRAINED
    source = ModelSource("test", "local", ggufs["Q4_K_M"], "0" * 64, presets)
    pool = Pool(Path("llama-server"), source, load_settings(), Metrics())
    assert {r.context_size for r in pool.replicas} == {TRAINED}


def test_shipped_profiles_declare_what_they_train():
    for name in ("tiny", "small", "300m"):
        p = load_profile(name)
        assert p.model.max_position is None
        assert p.context == p.pretrain.seq_len
        assert p.eval.max_new_tokens < p.context
        assert all(n is None or n <= p.context for n in (p.sft.max_length, p.dpo.max_length, p.gguf.window))
    assert load_profile("tiny").context == 128  # declared as trained: training at 1024 would slow the run
    assert load_profile("300m").context == 2048  # trained at the context it declared before


def test_profiles_command_states_the_context(capsys):
    assert main(["profiles", "tiny"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("steps of 8x128 tokens; context 128")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("sft: {max_length: 512}", "sft.max_length 512 exceeds the trained context pretrain.seq_len 128"),
        ("gguf: {window: 256}", "gguf.window 256 exceeds the trained context pretrain.seq_len 128"),
        ("eval: {max_new_tokens: 128}", "eval.max_new_tokens 128 leaves no room for a prompt"),
        ("model: {max_position: 1024}", "model.max_position 1024 is not the trained context pretrain.seq_len 128"),
    ],
)
def test_a_length_past_the_trained_context_is_one_line_naming_file_and_key(tmp_path, capsys, setting, message):
    mine = tmp_path / "mine.yaml"
    mine.write_text(f"base: tiny\n{setting}\n")
    with pytest.raises(ProfileError, match=f"^{mine}: {message}"):
        load_profile(mine)
    assert main(["profiles", str(mine)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kiln: error: ")
    assert message in err
    assert err.count("\n") == 1


def test_a_copied_checkpoint_without_a_context_is_refused(tiny_base, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(tiny_base, broken)
    config = read_json(broken / "config.json")
    del config["max_position_embeddings"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(KilnError, match="max_position_embeddings is missing"):
        model_context(broken)


def test_a_context_below_llama_cpps_padding_is_still_the_limit(tiny_base, tmp_path, monkeypatch):
    """llama.cpp pads a 128-token context to 256 (`n_ctx()` says 256): the benchmark and HumanEval
    must still stop at the 128 the file declares, where llama-cpp-python's buffers end."""

    from pipeline.release.gguf_export import convert_to_gguf

    short = tmp_path / "short"
    shutil.copytree(tiny_base, short)
    config = read_json(short / "config.json")
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 128}))
    path = convert_to_gguf(short, tmp_path / "short-F16.gguf")
    assert declared_context(path) == 128
    llm = load(path, n_ctx=512)
    try:
        speed = measure_speed(llm, list(range(5, 40)), repeats=1, requests=2)
    finally:
        llm.close()
    assert (speed["pp_tokens"], speed["tg_tokens"]) == (128, 111)

    fed = _positions_asked(monkeypatch)
    rows = generate(path, task_ids(2), max_new_tokens=100, progress=False)
    assert max(fed) == 128
    assert all(r["prompt_tokens_cut"] > 0 for r in rows)


def test_lm_eval_documents_whose_answer_outgrows_the_context_are_left_out_and_counted(
    tiny_base, small_corpus, tmp_path
):
    """lm-eval refuses (asserts on) an answer longer than the whole context; such documents are
    left out when the tasks are written, and counted."""
    from pipeline.data.clean import read_split
    from pipeline.eval.evaluation import _answer_fits

    short = tmp_path / "short"
    shutil.copytree(tiny_base, short)
    config = read_json(short / "config.json")
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 24}))
    records = list(read_split(small_corpus, "validation"))
    fits = _answer_fits(short, 24)
    written, _, left_out = write_kiln_tasks(records, tmp_path / "tasks", limit=None, answer_fits=fits)
    everything, _, none_out = write_kiln_tasks(records, tmp_path / "all", limit=None)
    assert left_out["kiln_body_choice"] > 0
    assert set(none_out.values()) == {0}
    assert written.get("kiln_body_choice", 0) + left_out["kiln_body_choice"] == everything["kiln_body_choice"]
    tasks = list(written)
    scores = lm_eval_scores(short, task_manager(tmp_path / "tasks", []), tasks, 4, 4)  # no assertion inside lm-eval
    assert set(scores) == set(tasks)


def test_compare_names_speed_by_the_lengths_measured_and_reads_older_benchmarks():
    from pipeline.release.compare import _gguf_figures

    spread = {"median": 10.0, "min": 9.0, "max": 11.0}
    older = {"tg128_tokens_per_s": spread, "pp512_tokens_per_s": spread, "time_to_first_token_s": 0.1}
    newer = {"tg_tokens_per_s": spread, "pp_tokens_per_s": spread, "tg_tokens": 111, "pp_tokens": 128,
             "time_to_first_token_s": 0.1}  # fmt: skip
    assert {"gguf.Q.tg128_tokens_per_s", "gguf.Q.pp512_tokens_per_s"} <= set(_gguf_figures({"files": {"Q": older}}))
    assert {"gguf.Q.tg111_tokens_per_s", "gguf.Q.pp128_tokens_per_s"} <= set(_gguf_figures({"files": {"Q": newer}}))


def _positions_asked(monkeypatch) -> list[int]:
    """Record prompt + max_tokens of every llama.cpp completion: the positions it may fill."""
    import llama_cpp

    fed = []
    completion = llama_cpp.Llama.create_completion

    def spy_completion(self, prompt, max_tokens=16, **kwargs):
        fed.append(len(prompt) + max_tokens)
        return completion(self, prompt, max_tokens=max_tokens, **kwargs)

    monkeypatch.setattr(llama_cpp.Llama, "create_completion", spy_completion)
    return fed
