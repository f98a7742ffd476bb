"""The corpus assets under Dagster: materialize raw_corpus -> clean_corpus into tmp_path."""

import json
import random

import yaml
from dagster import materialize

from assets.corpus import clean_corpus, clean_corpus_not_empty, clean_corpus_pii_free, raw_corpus
from resources import KilnSettings


def test_materialize_raw_to_clean(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(0)
    words = "model token stage corpus river table window engine signal garden market letter".split()

    def phrase(n):  # distinct documents: random word order defeats the near-duplicate filter
        return " ".join(rng.choice(words) + str(rng.randrange(50)) for _ in range(n))

    for i in range(30):
        body = "\n".join(f"    {w} = '{phrase(4)}'" for w in words)
        (src / f"mod{i}.py").write_text(f'"""{phrase(6)}."""\n\n\ndef f{i}():\n{body}\n    return locals()\n')
    notes = [f"{phrase(80)}. Reach the owner at owner{i}@example.com today." for i in range(30)]
    (src / "notes.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in notes))
    profile = tmp_path / "test.yaml"
    profile.write_text(
        yaml.safe_dump(
            {
                "base": "tiny",
                "corpus": {"sources": [{"path": str(src)}], "max_bytes": None, "code_share": None},
                "clean": {"validation_share": 0.2},
            }
        )
    )
    kiln = KilnSettings(profile=str(profile), work_dir=str(tmp_path / "work"))
    result = materialize(
        [raw_corpus, clean_corpus, clean_corpus_not_empty, clean_corpus_pii_free], resources={"kiln": kiln}
    )
    assert result.success
    mats = {
        e.asset_key.path[-1]: e.event_specific_data.materialization.metadata
        for e in result.get_asset_materialization_events()
    }
    assert mats["raw_corpus"]["documents"].value == 60
    assert mats["clean_corpus"]["input_documents"].value == 60
    assert mats["clean_corpus"]["kept_documents"].value == 60
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"clean_corpus_not_empty": True, "clean_corpus_pii_free": True}
    stats = json.loads((tmp_path / "work" / "test" / "clean_corpus" / "stats.json").read_text())
    assert stats["pii"]["email"] == 30
    assert stats["input_documents"] == stats["kept_documents"] + sum(stats["dropped"].values())
