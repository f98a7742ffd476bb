"""Profiles as YAML files: the shipped ones, `base:` inheritance, and one-line errors naming file and key."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import PROFILE_NAMES, Profile, ProfileError, load_profile
from pipeline.data.ingest import Source
from pipeline.layout import PROFILES_DIR, REPO_ROOT
from pipeline.train.pretrain import count_parameters


def test_the_shipped_profiles_are_the_files_in_profiles():
    assert PROFILES_DIR == REPO_ROOT / "profiles"
    assert sorted(PROFILE_NAMES) == ["300m", "small", "tiny"]
    assert sorted(p.name for p in PROFILES_DIR.iterdir()) == ["300m.yaml", "small.yaml", "tiny.yaml"]


@pytest.mark.parametrize("name", ["tiny", "small", "300m"])
def test_shipped_profile_loads_and_its_header_states_its_size_and_command(name):
    profile = load_profile(name)
    assert profile.name == name
    header = (PROFILES_DIR / f"{name}.yaml").read_text().split("\n\n")[0]
    stated = re.search(r"parameters: ([\d,]+)", header).group(1)
    assert count_parameters(profile.model, profile.tokenizer.vocab_size) == int(stated.replace(",", ""))
    assert f"kiln run --profile {name}" in header
    assert "make run" in header


def test_shipped_profiles_hold_what_they_promise():
    tiny, small, big = load_profile("tiny"), load_profile("small"), load_profile("300m")
    assert tiny.tokenizer.min_frequency == 1
    assert tiny.eval.lm_eval_tasks == ["arc_easy"]
    assert small.corpus.sources[1] == Source(builtin="site_packages")
    assert small.pretrain.lr == 1.5e-3
    assert small.eval.humaneval_problems is None
    assert small.clean.tasks == 2
    assert big.model.rope_theta == 500_000.0
    assert isinstance(big.model.rope_theta, float)
    assert big.pretrain.lr == 6e-4
    assert big.eval.pass_k == [1, 10]
    assert big.corpus.max_bytes is None
    assert big.clean.tasks == (os.cpu_count() or 1)  # `tasks: null`: one per core


def test_no_argument_is_kiln_profile_else_tiny(monkeypatch):
    monkeypatch.delenv("KILN_PROFILE", raising=False)
    assert load_profile().name == "tiny"
    monkeypatch.setenv("KILN_PROFILE", "small")
    assert load_profile().name == "small"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_base_and_overrides(tmp_path):
    mine = _write(tmp_path / "mine.yaml", "base: small\npretrain:\n  steps: 10\n  warmup_steps: 2\n")
    profile, small = load_profile(mine), load_profile("small")
    assert profile.name == "mine"
    assert (profile.pretrain.steps, profile.pretrain.warmup_steps) == (10, 2)
    assert profile.pretrain.seq_len == small.pretrain.seq_len == 256  # the rest of the section is the base's
    assert profile.model == small.model
    assert profile.corpus == small.corpus


def test_without_base_the_dataclass_defaults(tmp_path):
    profile = load_profile(_write(tmp_path / "plain.yaml", "sft:\n  steps: 3\n"))
    assert profile.to_dict() == {**Profile("plain").to_dict(), "sft": {**Profile("plain").to_dict()["sft"], "steps": 3}}
    assert load_profile(_write(tmp_path / "empty.yaml", "")) == Profile("empty")


def test_a_chain_of_bases_relative_to_each_file(tmp_path):
    (tmp_path / "team").mkdir()
    _write(tmp_path / "team" / "shared.yaml", "base: tiny\nsft: {steps: 5, lr: 2e-4}\ndpo: {beta: 0.2}\n")
    _write(tmp_path / "team" / "data.yaml", "base: shared.yaml\ncorpus:\n  sources: [{path: /data/code}]\n")
    mine = _write(tmp_path / "mine.yaml", "base: team/data.yaml\nname: mine-v2\ndpo: {beta: 0.3}\n")
    profile = load_profile(mine)
    assert profile.name == "mine-v2"
    assert profile.corpus.sources == [Source(path="/data/code")]
    assert (profile.sft.steps, profile.sft.lr, profile.dpo.beta) == (5, 2e-4, 0.3)
    assert profile.tokenizer.min_frequency == 1  # from tiny, three files up


def test_a_cycle_of_bases_is_an_error(tmp_path):
    _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ProfileError, match=r"a\.yaml: base profiles form a cycle \(a\.yaml -> b\.yaml -> a\.yaml\)"):
        load_profile(tmp_path / "a.yaml")
    with pytest.raises(ProfileError, match="cycle"):
        load_profile(_write(tmp_path / "self.yaml", "base: self.yaml\n"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pretrain:\n  lr: fast\n", "pretrain.lr: expected a number, got 'fast'"),
        ("pretrain: {steps: 1.5}\n", "pretrain.steps: expected an integer, got 1.5"),
        ("pretrain: {steps: true}\n", "pretrain.steps: expected an integer, got True"),
        ("corpus: {max_bytes: lots}\n", "corpus.max_bytes: expected an integer or null, got 'lots'"),
        ("pretrain: {steps: null}\n", "pretrain.steps: expected an integer, got null"),
        ("eval: {pass_k: [1, ten]}\n", "eval.pass_k[1]: expected an integer, got 'ten'"),
        ("eval: {lm_eval_tasks: hellaswag}\n", "eval.lm_eval_tasks: expected a list of strings, got 'hellaswag'"),
        ("dpo: {quantize: 1}\n", "dpo.quantize: expected true or false, got 1"),
        ("pretrain: 5\n", "pretrain: expected a mapping, got 5"),
        ("pretrian: {steps: 5}\n", "pretrian: unknown setting (known: name, corpus,"),
        ("model: {layers: 2}\n", "model.layers: unknown setting (known: hidden_size,"),
        (
            "corpus:\n  sources: [{builtin: python_docs}, {path: /x, colour: red}]\n",
            r"corpus.sources\[1\].colour: unknown",
        ),
        ("corpus:\n  sources: [{builtin: python_docs}, {}]\n", r"corpus.sources\[1\]: a source needs exactly one of"),
        ("clean: {minhash_threshold: 3}\n", r"clean.minhash_threshold must be in \(0, 1\), not 3"),
        ("base: huge\n", "base 'huge' is not a profile"),
        ("- a list\n", "expected a mapping of settings, got"),
        ("pretrain: {steps: [}\n", "not valid YAML"),
    ],
)
def test_a_bad_value_is_one_line_naming_file_and_key(tmp_path, text, message):
    bad = _write(tmp_path / "my.yaml", text)
    with pytest.raises(ProfileError) as error:
        load_profile(bad)
    line = str(error.value)
    assert line.startswith(f"{bad}: ")
    assert "\n" not in line
    assert re.search(message if "\\" in message else re.escape(message), line)


def test_an_error_in_a_base_names_the_base(tmp_path):
    _write(tmp_path / "base.yaml", "sft: {lr: quick}\n")
    with pytest.raises(ProfileError, match=rf"^{re.escape(str(tmp_path / 'base.yaml'))}: sft.lr: expected a number"):
        load_profile(_write(tmp_path / "mine.yaml", "base: base.yaml\n"))
    with pytest.raises(ProfileError, match="missing.yaml: profile file not found"):
        load_profile(_write(tmp_path / "mine.yaml", "base: missing.yaml\n"))


def test_numbers_and_words_read_as_yaml_1_2(tmp_path):
    """`3e-4` is a number and `off` a string (YAML 1.1 would read a string and a boolean)."""
    profile = load_profile(_write(tmp_path / "p.yaml", "pretrain: {lr: 3e-4, compile: off, steps: 20_000}\n"))
    assert (profile.pretrain.lr, profile.pretrain.compile, profile.pretrain.steps) == (3e-4, "off", 20_000)
    assert load_profile(_write(tmp_path / "q.yaml", "model: {rope_theta: 10000}\n")).model.rope_theta == 10_000.0
    assert isinstance(load_profile(tmp_path / "q.yaml").model.rope_theta, float)


@pytest.mark.slow  # a fresh interpreter imports transformers: about 8 s
def test_kiln_profiles_finds_the_files_from_any_folder(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "profiles", "small"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(" small:   41,558,528 parameters")
