"""kiln compare's paired statistics: what they star on versions that did not move, and on one that broke."""

import math

import numpy as np
import pytest

from pipeline.release.compare import _tests
from pipeline.release.paired import holm, paired_mean, paired_ratio, paired_t, with_seed_spread

TASKS = ("kiln_body_choice.acc", "kiln_next_line.acc", "kiln_next_sentence_ko.acc", "humaneval.pass_at_1")


def _version(
    number: str, seed: int, skill: float = 0.0, bpb_factor: float = 1.0, items: bool = True, seed_sd: float = 0.0
) -> dict:
    """A version trained from the same data with its own seed: each item has a fixed difficulty
    (the data), and whether this version gets it right is its own draw (the seed). `skill` moves
    every item's chance; `bpb_factor` scales every document's bits. `seed_sd`: the seed also makes
    the whole model better or worse on every document, by a factor drawn with that spread (as
    tiny's seeds do: a worse model is worse on nearly every document)."""
    data, own = np.random.default_rng(1234), np.random.default_rng(seed)
    bpb_factor *= 1 + own.normal(0, seed_sd)
    figures = {}
    for task in TASKS:
        chance = np.clip(data.beta(2, 3, size=300) + skill, 0, 1)
        right = (own.random(300) < chance).astype(float).tolist()
        figures[f"eval.dpo.{task}"] = {"value": float(np.mean(right)), "better": "higher", "items": right,
                                       "ids": [f"{task}:{i}" for i in range(300)]}  # fmt: skip
    n_bytes = data.integers(200, 4000, size=400)
    bits = n_bytes * data.uniform(1.5, 3.0, size=400) * own.normal(1.0, 0.01, size=400) * bpb_factor
    docs = [[float(b), int(n)] for b, n in zip(bits, n_bytes, strict=True)]
    figures["eval.dpo.bits_per_byte"] = {"value": float(bits.sum() / n_bytes.sum()), "better": "lower",
                                         "items": docs, "ids": [f"doc{i}" for i in range(400)]}  # fmt: skip
    if not items:
        for f in figures.values():
            f.pop("items"), f.pop("ids")
    return {"version": number, "figures": figures}


def test_same_data_different_seeds_star_nothing_most_of_the_time():
    """20 comparisons of versions from identical data with different seeds (5 figures each):
    Holm's correction keeps the chance of any star in a comparison near 5%."""
    stars = [sum(t["moved"] for t in _tests(_version("1", 2 * k), _version("2", 2 * k + 1), {}, [])) for k in range(20)]
    assert sum(s > 0 for s in stars) <= 2, stars  # about 1 in 20 expected
    # the old rule (a difference beyond the combined standard error) starred about a third of the figures


SEED_SD = 0.01  # bits per byte moved by 1% of itself, one seed to another


def test_a_seed_that_moves_the_whole_model_is_starred_unless_the_seed_spread_is_known():
    """Seeds that shift the whole model: the paired test stars those shifts (real differences
    between the two models); with the spread of 6 other re-trains of the recipe, at most about
    1 in 20 comparisons stars anything, and a version 5% worse is still starred."""
    retrains = [_version(str(k), 100 + k, seed_sd=SEED_SD)["figures"] for k in range(6)]
    sd = {n: float(np.std([f[n]["value"] for f in retrains], ddof=1)) for n in retrains[0]}
    spread = {"versions": [str(k) for k in range(6)], "sd": sd}
    pairs = [(_version("1", 2 * k, seed_sd=SEED_SD), _version("2", 2 * k + 1, seed_sd=SEED_SD)) for k in range(20)]
    plain = [sum(t["moved"] for t in _tests(a, b, {}, [])) for a, b in pairs]
    widened = [sum(t["moved"] for t in _tests(a, b, {}, [], spread)) for a, b in pairs]
    assert sum(s > 0 for s in plain) >= 10, plain  # most pairs: the paired interval is narrower than the seed
    assert sum(s > 0 for s in widened) <= 2, widened
    broken = _tests(pairs[0][0], _version("3", 99, bpb_factor=1.05, seed_sd=SEED_SD), {}, [], spread)
    bpb = next(t for t in broken if t["figure"] == "eval.dpo.bits_per_byte")
    assert bpb["moved"]
    assert bpb["direction"] == "worse"
    assert "seed spread of 6 re-trains" in bpb["method"]


def test_a_broken_version_stars_its_regressions():
    notes: list[str] = []
    tests = _tests(_version("1", 1), _version("2", 2, skill=-0.15, bpb_factor=1.05), {}, notes)
    assert {t["figure"] for t in tests if t["moved"]} == {f"eval.dpo.{t}" for t in TASKS} | {"eval.dpo.bits_per_byte"}
    assert all(t["direction"] == "worse" and t["p_holm"] < 0.05 for t in tests)
    bpb = next(t for t in tests if t["figure"] == "eval.dpo.bits_per_byte")
    assert bpb["low"] > 0
    assert bpb["method"].startswith("paired bootstrap")


def test_a_version_without_per_item_results_gets_a_note_not_a_star():
    notes: list[str] = []
    tests = _tests(_version("1", 1, items=False), _version("2", 2, skill=-0.3), {}, notes)
    assert tests == []
    assert any("not tested" in n for n in notes)

    one_document = [_version(str(v), v) for v in (1, 2)]
    for v in one_document:
        bpb = v["figures"]["eval.dpo.bits_per_byte"]
        bpb["items"], bpb["ids"] = bpb["items"][:1], bpb["ids"][:1]
    notes = []
    tests = _tests(*one_document, {}, notes)
    assert "eval.dpo.bits_per_byte" not in {t["figure"] for t in tests}
    assert notes == ["dpo.bits_per_byte: fewer than 2 items shared by both versions, shown, not tested"]


def test_stored_speed_is_never_tested_and_remeasured_speed_is():
    first, other = _version("1", 1), _version("2", 2)
    for v, tg in ((first, 1000.0), (other, 700.0)):
        v["figures"]["gguf.Q4_K_M.tg128_tokens_per_s"] = {"value": tg, "range": [tg - 5, tg + 5], "better": "higher"}
    remeasured = {
        "1": {"remeasured.Q4_K_M.tg128_tokens_per_s": {"value": 1000.0, "repeats": [1000, 1010, 990, 1005, 995],
                                                        "better": "higher"}},
        "2": {"remeasured.Q4_K_M.tg128_tokens_per_s": {"value": 1000.0, "repeats": [1002, 1009, 991, 1003, 996],
                                                        "better": "higher"}},
    }  # fmt: skip
    tests = {t["figure"]: t for t in _tests(first, other, remeasured, [])}
    assert "gguf.Q4_K_M.tg128_tokens_per_s" not in tests  # 1000 -> 700 stored: different runs, different load
    speed = tests["remeasured.Q4_K_M.tg128_tokens_per_s"]
    assert speed["n"] == 5
    assert speed["low"] < 0 < speed["high"]
    assert not speed["moved"]


def test_statistics_by_hand():
    same = paired_mean([1, 0, 1, 0], [1, 0, 1, 0])
    assert (same.delta, same.low, same.high, same.p) == (0.0, 0.0, 0.0, 1.0)
    up = paired_mean([0.0] * 40, [1.0] * 10 + [0.0] * 30)  # 10 discordant pairs, all one way
    assert up.delta == pytest.approx(0.25)
    assert up.low > 0
    assert up.p < 0.01
    ratio = paired_ratio([[2.0, 1.0], [4.0, 2.0]], [[1.0, 1.0], [2.0, 2.0]])
    assert ratio.delta == pytest.approx(-1.0)
    assert paired_t([1, 2, 3, 4], [2, 3, 4, 5]) is None  # fewer than 5 repeats: no test
    t = paired_t([10, 11, 12, 13, 14], [11, 12.5, 13, 14.5, 15])
    assert t.delta == pytest.approx(1.2)
    assert t.low > 0
    assert t.method == "paired t over interleaved repeats"
    wide = with_seed_spread(t, spread=0.5, retrains=4)  # seeds dominate: t with a little over 3 degrees of freedom
    assert wide.delta == t.delta
    assert wide.se == pytest.approx(math.sqrt(t.se**2 + 2 * 0.5**2))
    assert 3.0 < (wide.high - wide.low) / (2 * wide.se) < 3.19  # t(0.975, 3) = 3.18; normal 1.96
    assert wide.high - wide.low > t.high - t.low
    assert wide.p > t.p
    assert with_seed_spread(t, spread=0.0, retrains=4).p == t.p  # re-trains that agreed exactly add nothing
    rejected, adjusted = holm([0.01, 0.04, 0.03, 0.5])
    assert rejected == [True, False, False, False]  # 0.01 x 4 = 0.04; then 0.03 x 3 = 0.09 stops it
    assert adjusted == pytest.approx([0.04, 0.09, 0.09, 0.5])
