"""The kiln command line: `kiln clean` on a user's files, and one-line errors for mistakes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import COMMANDS, main
from pipeline.cli.command import Group

KILN = [sys.executable, "-m", "pipeline.cli"]


def _run(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    return subprocess.run(KILN + list(args), capture_output=True, text=True, cwd=cwd, env=env)


def test_clean_a_users_files(tmp_path, capsys):
    src = tmp_path / "mine"
    src.mkdir()
    prose = " ".join(f"word{i} of a real looking sentence number {i} with enough letters" for i in range(12))
    (src / "a.txt").write_text(prose + " Mail me at someone@example.org.")
    (src / "b.txt").write_text(prose + " Mail me at someone@example.org.")  # exact duplicate
    (src / "c.jsonl").write_text('{"text": "ok"}\n{bad json\n')
    code = main(["clean", str(src), "--output", str(tmp_path / "out"), "--quiet"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["input_documents"] == 4
    assert summary["dropped"] == {"exact_duplicate": 1, "malformed_json": 1, "too_few_words": 1}
    assert summary["pii"] == {"email": 1}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["clean", "logs", "rejected", "stats.json"]


def test_missing_input_is_one_line_and_exit_2(tmp_path):
    proc = _run("clean", str(tmp_path / "nope.txt"), "--output", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"kiln: error: {tmp_path / 'nope.txt'}: no such file or folder"
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_bad_profile_is_one_line(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("clean:\n  minhash_threshold: 3\n")
    proc = _run("profiles", str(bad))
    assert proc.returncode == 2
    assert "minhash_threshold must be in (0, 1)" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    bad.write_text("clean:\n  no_such_setting: 1\n")
    proc = _run("profiles", str(bad))
    assert "p.yaml: clean.no_such_setting: unknown setting" in proc.stderr


def test_help_explains_the_commands():
    proc = _run("--help")
    assert proc.returncode == 0
    for command in ("clean", "profiles", "run"):
        assert command in proc.stdout


def test_tokenizer_then_pretrain_alone(small_corpus, tmp_path, capsys):
    profile = tmp_path / "p.yaml"
    profile.write_text(
        "base: tiny\n"
        "tokenizer: {vocab_size: 600, min_frequency: 1}\n"
        "model: {hidden_size: 256, intermediate_size: 256, num_layers: 1}\n"
        "pretrain: {seq_len: 32, micro_batch: 4, steps: 4, warmup_steps: 1, eval_every: 4, eval_batches: 1}\n"
        "eval: {max_new_tokens: 16}\n"
    )
    assert (
        main(
            [
                "tokenizer",
                "--clean",
                str(small_corpus.parent),
                "--output",
                str(tmp_path / "t"),
                "--profile",
                str(profile),
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["vocab_size"] == 600
    code = main(
        ["pretrain", "--clean", str(small_corpus), "--tokenizer", str(tmp_path / "t" / "tokenizer"),
         "--output", str(tmp_path / "m"), "--profile", str(profile)]
    )  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["val_bpb"] > 0
    assert (tmp_path / "m" / "model" / "model.safetensors").exists()


def test_profiles_lists_parameter_counts():
    proc = _run("profiles")
    assert proc.returncode == 0
    assert "268,739,584 parameters" in proc.stdout  # 300m, counted on the meta device
    assert [line.split(":")[0].strip() for line in proc.stdout.splitlines()] == ["tiny", "small", "300m"]


def _every_command():
    """(argv prefix, command) for every `kiln` command and every action of a group."""
    for name, command in COMMANDS.items():
        if isinstance(command, Group):
            yield from (([name, action], sub) for action, sub in command.actions.items())
        yield [name], command


TAKES_PROFILE = {
    "clean", "tokenizer", "pretrain", "tune", "models", "compare", "seeds", "promote", "rollback", "pull", "history",
    "run", "serve", "replica",
}  # fmt: skip
EVERY_COMMAND = list(_every_command())


@pytest.mark.parametrize(("argv", "command"), EVERY_COMMAND, ids=[" ".join(argv) for argv, _ in EVERY_COMMAND])
def test_every_command_explains_itself(argv, command, capsys):
    def help_of(argv):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--help"])
        assert exit_.value.code == 0
        return capsys.readouterr().out

    def words(text):  # argparse rewraps the texts, breaking lines at spaces and hyphens
        return "".join(text.split())

    out = help_of(argv)
    assert out.startswith(f"usage: kiln {' '.join(argv)}")
    assert words(command.description or command.help) in words(out)
    assert words(command.help) in words(help_of(argv[:-1]))  # its line in `kiln --help` (or the group's)
    assert ("--profile" in out) == (argv[0] in TAKES_PROFILE)


@pytest.mark.parametrize(
    "argv",
    [
        ["clean", "IN", "--output", "OUT"],
        ["tokenizer", "--clean", "CORPUS", "--output", "OUT"],
        ["pretrain", "--clean", "CORPUS", "--tokenizer", "TOK", "--output", "OUT"],
        ["models"],
        ["pull", "production", "--output", "OUT"],
        ["run"],
    ],
    ids=lambda argv: argv[0],
)
def test_unknown_profile_is_one_line_and_exit_2(argv, small_corpus, tmp_path, capsys):
    (tmp_path / "IN").write_text("some text")
    paths = {"IN": tmp_path / "IN", "OUT": tmp_path / "out", "CORPUS": small_corpus, "TOK": tmp_path / "tok"}
    argv = [str(paths.get(a, a)) for a in argv]
    assert main([*argv, "--profile", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kiln: error: ")
    assert "'nope'" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_run_names_the_artifacts_under_kiln_work_dir(tmp_path, monkeypatch):
    from pipeline.cli.run import done_message

    monkeypatch.setenv("KILN_WORK_DIR", str(tmp_path / "work"))
    message = done_message("my.yaml", "mine", "/somewhere/.dagster_home")
    assert f"artifacts:     {tmp_path / 'work' / 'mine'}\n" in message
    assert "experiment kiln-mine)" in message
    assert "kiln models --profile my.yaml\n" in message


def test_run_tags_a_forced_run():
    import json

    from pipeline.cli.run import dagster_command
    from pipeline.reuse import FORCE_TAG

    plain, forced = dagster_command("kiln_pipeline", "c.yaml", False), dagster_command("data", "c.yaml", True)
    assert "--tags" not in plain
    assert plain[plain.index("-j") + 1] == "kiln_pipeline"
    assert json.loads(forced[forced.index("--tags") + 1]) == {FORCE_TAG: "true"}
