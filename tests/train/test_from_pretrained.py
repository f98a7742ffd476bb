"""A profile with `model.from_pretrained`: every asset materialized under Dagster on a test-sized
model taken from the model cache instead of pretrained, through registered_model."""

import json

import pytest
from dagster import DagsterInstance, load_asset_checks_from_modules, load_assets_from_modules, materialize
from hub_models import byte_level_tokenizer, save_in_hub_cache, tiny_llama, train_briefly
from test_assets import ASSETS, E2E_PROFILE, STAGE_MODULES, materialized, write_e2e_sources, write_profile

from pipeline.release import registry
from pipeline.tracking import client
from resources import KilnSettings, MLflowTracking

pytestmark = pytest.mark.slow

MODEL_ID = "test/smol-base"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The e2e sources, a small model trained on text like them in a hub cache, and one Dagster
    run of every asset and check on a profile that starts from it."""
    root = tmp_path_factory.mktemp("from_pretrained")
    write_e2e_sources(root / "src")
    texts = [p.read_text() for p in sorted((root / "src").iterdir())]
    tok = byte_level_tokenizer(texts, vocab_size=400)
    model = tiny_llama(tok, tie=False)
    train_briefly(model, tok, texts, steps=60)
    save_in_hub_cache(model, tok, root / "cache", MODEL_ID)
    settings = {k: v for k, v in E2E_PROFILE.items() if k not in ("tokenizer", "model")}
    profile = write_profile(
        root / "fp.yaml",
        {**settings, "model": {"from_pretrained": MODEL_ID}, "corpus": {"sources": [{"path": str(root / "src")}],
                                                                        "max_bytes": None}},
    )  # fmt: skip
    kiln = KilnSettings(profile=str(profile), work_dir=str(root / "work"))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    resources = {"kiln": kiln, "mlflow": MLflowTracking(tracking_uri=uri, system_metrics=False)}
    assets = list(load_assets_from_modules(STAGE_MODULES))
    checks = list(load_asset_checks_from_modules(STAGE_MODULES))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KILN_MODEL_CACHE", str(root / "cache"))
        result = materialize([*assets, *checks], resources=resources, instance=DagsterInstance.ephemeral())
    return result, kiln.layout, uri, tok


def metadata_of(result, asset: str) -> dict:
    for e in result.get_asset_materialization_events():
        if e.asset_key.path[-1] == asset:
            return {k: v.value for k, v in e.event_specific_data.materialization.metadata.items()}
    raise KeyError(asset)


def test_every_asset_materializes_and_every_check_passes(run):
    result, *_ = run
    assert result.success
    assert materialized(result) == ASSETS
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert all(checks.values())
    assert len(checks) == 7


def test_the_tokenizer_is_the_models_own(run):
    result, layout, _, tok = run
    meta = metadata_of(result, "tokenizer")
    assert meta["source"] == f"from_pretrained {MODEL_ID}"
    assert meta["vocab_size"] == len(tok)
    saved = json.loads((layout.tokenizer / "tokenizer.json").read_text())
    assert saved["model"]["vocab"] == json.loads(tok.backend_tokenizer.to_str())["model"]["vocab"]
    config = json.loads((layout.tokenizer / "tokenizer_config.json").read_text())
    assert config["pad_token"] == "<|endoftext|>"  # the base tokenizer had none: SFT batches need one


def test_the_base_model_is_the_downloaded_one(run):
    from safetensors.torch import load_file

    result, layout, _, _ = run
    meta = metadata_of(result, "base_model")
    assert meta["source"] == f"from_pretrained {MODEL_ID}"
    assert "steps" not in meta
    summary = json.loads(layout.base_summary.read_text())
    cached = load_file(next((layout.work_dir / "../cache").resolve().rglob("model.safetensors")))
    saved = load_file(layout.model_dir("base") / "model.safetensors")
    assert saved.keys() == cached.keys()
    assert all((saved[k] == cached[k]).all() for k in saved)
    assert "lm_head.weight" in saved  # untied, as downloaded
    assert summary["val_bpb"] < summary["unigram_bpb"]
    assert summary["parameters"] == meta["parameters"]


def test_the_registered_version_ships_it_as_gguf(run):
    _, layout, uri, _ = run
    assert [v["aliases"] for v in registry.list_versions(uri, "fp")] == ["candidate"]
    tags = client(uri).get_model_version("kiln-fp", "1").tags
    parameters = json.loads(layout.base_summary.read_text())["parameters"]
    assert float(tags["metric.parameters"]) == pytest.approx(parameters, rel=1e-5)
    bench = json.loads(layout.benchmark_json.read_text())
    assert all(f["parity"]["passed"] for f in bench["files"].values())
    card = (layout.bundle_dir / "MODEL_CARD.md").read_text()
    assert f"Fine-tuned from {MODEL_ID}" in card
