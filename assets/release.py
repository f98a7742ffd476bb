"""gguf_model, gguf_benchmark (with the parity gate), sampling_preset and registered_model."""

from dagster import AssetCheckResult, AssetExecutionContext, MaterializeResult, MetadataValue, asset, asset_check

from assets.corpus import clean_corpus
from assets.metadata import log_to_mlflow, md_image, md_table
from assets.post_training import dpo_model
from assets.stage import ACCELERATOR, Stage, StageConfig, forced
from pipeline.charts import bar_chart, gguf_comparison, optimisation_history
from pipeline.data.clean import read_split
from pipeline.io import read_json, write_json
from pipeline.release.gguf_bench import benchmark_all, markdown_table
from pipeline.release.gguf_export import export_all
from pipeline.release.model_card import build_bundle
from pipeline.release.registry import (
    SHIPPED,
    aliases_of,
    bundle_hashes,
    model_name,
    quality_gate,
    register,
    same_model,
    version_tags,
)
from pipeline.release.tuning import (
    TRIAL_CURVES,
    TUNED_QUANT,
    build_sampling_preset,
    preset_tags,
    read_summary,
    trial_history,
)
from pipeline.release.tuning import markdown_table as trials_table
from resources import KilnSettings, MLflowTracking


@asset(group_name="release", code_version="1", deps=[dpo_model], op_tags=ACCELERATOR)
def gguf_model(
    context: AssetExecutionContext, config: StageConfig, kiln: KilnSettings, mlflow: MLflowTracking
) -> MaterializeResult:
    """The final checkpoint as GGUF F16 (our converter on the `gguf` library: tokenizer, chat
    template and hyper-parameters included), then Q8_0 and Q4_K_M from llama.cpp's quantizer."""
    profile, layout = kiln.load_with_layout()
    stage = Stage.start(context, layout, config, {}, inputs=[layout.model_dir(SHIPPED)])
    if stage.reused:
        return stage.reuse()
    files = export_all(layout.model_dir(SHIPPED), layout.gguf_dir, layout.gguf_name, context.run.run_id[:8])
    write_json(layout.gguf_files, {k: str(v) for k, v in files.items()})
    metadata = {
        "path": MetadataValue.path(str(layout.gguf_dir)),
        **{f"{k}_bytes": p.stat().st_size for k, p in files.items()},
    }
    with mlflow.stage(context.run.run_id, profile.name, "gguf_model") as log:
        log_to_mlflow(log, metadata)
    return stage.finish(metadata)


@asset(group_name="release", code_version="4", deps=[gguf_model, clean_corpus], op_tags=ACCELERATOR)
def gguf_benchmark(
    context: AssetExecutionContext, config: StageConfig, kiln: KilnSettings, mlflow: MLflowTracking
) -> MaterializeResult:
    """llama.cpp on every GGUF file: tokenizer and perplexity parity against the HF model,
    pp512/tg128 tokens/s (within the trained context), time to first token, latency percentiles,
    peak memory per context, share of the memory-bandwidth bound, cost per million tokens."""
    profile, layout = kiln.load_with_layout()
    inputs = [layout.gguf_dir, layout.model_dir(SHIPPED), layout.clean_splits]
    stage = Stage.start(context, layout, config, profile.gguf, inputs)
    if stage.reused:
        return stage.reuse()
    validation = [r["text"] for r in read_split(layout.clean_splits, "validation")]
    report = benchmark_all(read_json(layout.gguf_files), layout.model_dir(SHIPPED), validation, profile.gguf)
    write_json(layout.benchmark_json, report)
    r = report["files"]
    chart = gguf_comparison(r)
    metadata = {
        "path": MetadataValue.path(str(layout.benchmark_json)),
        "table": MetadataValue.md(markdown_table(r)),
        "comparison": md_image(chart, "GGUF comparison"),
        "machine_bandwidth_gb_s": report["machine_bandwidth_gb_s"],
        **{f"{k}_tg{v['tg_tokens']}_tokens_per_s": v["tg_tokens_per_s"]["median"] for k, v in r.items()},
        **{f"{k}_pp{v['pp_tokens']}_tokens_per_s": v["pp_tokens_per_s"]["median"] for k, v in r.items()},
        **{f"{k}_size_bytes": v["size_bytes"] for k, v in r.items()},
        **{f"{k}_perplexity_rel_diff": v["parity"]["perplexity_rel_diff"] for k, v in r.items()},
    }
    with mlflow.stage(context.run.run_id, profile.name, "gguf_benchmark") as log:
        log_to_mlflow(log, metadata, params=profile.gguf, files=[layout.benchmark_json], images={"gguf.png": chart})
    return stage.finish(metadata)


@asset_check(
    asset=gguf_benchmark,
    blocking=True,
    description="GGUF tokenization equals HF's; F16 perplexity within 1% of HF's, Q8_0 within 3%.",
)
def gguf_parity(kiln: KilnSettings) -> AssetCheckResult:
    report = read_json(kiln.layout.benchmark_json)
    parity = {k: v["parity"] for k, v in report["files"].items()}
    return AssetCheckResult(
        passed=all(p["passed"] for p in parity.values()),
        metadata={k: MetadataValue.json(p) for k, p in parity.items()},
    )


@asset(
    group_name="release", code_version="4", deps=[gguf_model, "eval_report"], op_tags=ACCELERATOR
)  # by key: assets.evaluation
def sampling_preset(
    context: AssetExecutionContext, config: StageConfig, kiln: KilnSettings, mlflow: MLflowTracking
) -> MaterializeResult:
    """Sampler values for the shipped GGUF from an Optuna study (TPE, median pruner, seeded) on the
    profile's held-out objective with a tokens/s floor relative to greedy measured in the study; the
    best trial is the `code` preset when it beats greedy on fresh items beyond the standard error,
    else greedy's values are (`untuned`); written with `greedy` and `balanced` as presets.json.
    After eval_report: both are CPU-heavy."""
    profile, layout = kiln.load_with_layout()
    s = profile.tune
    settings = {"tune": s, "timeout": profile.eval.timeout, "unsafe_sandbox": profile.eval.unsafe_sandbox}
    stage = Stage.start(context, layout, config, settings, inputs=[layout.gguf(TUNED_QUANT), layout.clean_splits])
    if stage.reused:
        return stage.reuse()
    summary = build_sampling_preset(layout, profile, say=context.log.info)
    best = summary["best"]
    charts = {
        "history.png": optimisation_history(summary["trials"], s.objective, s.min_tokens_per_s),
        "importance.png": bar_chart(summary["importances"] or {"(all equal)": 0.0}, "parameter importance"),
    }
    metadata = {
        "study": summary["study"], "storage": summary["storage"], "dashboard": summary["dashboard"],
        "best_trial": "none: greedy" if best["number"] is None else best["number"],
        f"best_{s.objective}": best["value"], "best_tokens_per_s": best["tokens_per_s"],
        "trials": MetadataValue.md(trials_table(summary)),
        "code_preset": MetadataValue.json(summary["presets"]["code"]),
        "history": md_image(charts["history.png"], "optimisation history"),
        "importance": md_image(charts["importance.png"], "parameter importance"),
        "greedy_tokens_per_s": summary["greedy"]["tokens_per_s"], "tokens_per_s_floor": summary["min_tokens_per_s"],
        "fresh_check": MetadataValue.json(summary.get("fresh") or {}),
        "untuned": summary.get("untuned") or "no: the best trial beat greedy on fresh items",
    }  # fmt: skip
    with mlflow.stage(context.run.run_id, profile.name, "sampling_preset") as log:
        params = {"code": summary["presets"]["code"], "tune": profile.to_dict()["tune"]}
        files = [layout.presets_json, layout.study_json]
        log_to_mlflow(log, metadata, params, files, charts, trial_history(summary), TRIAL_CURVES)
    return stage.finish(metadata)


@asset(group_name="release", code_version="5", deps=[gguf_benchmark, sampling_preset, "eval_report"])
def registered_model(
    context: AssetExecutionContext, config: StageConfig, kiln: KilnSettings, mlflow: MLflowTracking
) -> MaterializeResult:
    """A model version in the MLflow registry (`kiln-<profile>`): the GGUF files, the merged HF
    checkpoint, the model card and reports, the presets, a sha256 tag per file; alias `candidate`
    when the quality gate passes (GGUF parity, and the eval gate: no regression past production).
    A model already registered with the same files registers nothing (unless config.force)."""
    profile, layout = kiln.load_with_layout()
    stage = Stage.start(context, layout, None, {}, inputs=[])  # the registry, not a stored result, says what exists
    name = model_name(profile.name)
    bundle = build_bundle(layout, profile, context.run.run_id)
    hashes = bundle_hashes(layout.bundle_dir)
    same = None if forced(context, config) else same_model(mlflow.tracking_uri, profile.name, hashes)
    if same is not None:
        aliases = aliases_of(mlflow.tracking_uri, profile.name, same)
        context.log.info(f"{name} version {same} holds these files already ({aliases}): nothing registered")
        metadata = {"model": name, "version": int(same), "registered": False, "aliases": ", ".join(aliases)}
        return stage.finish(metadata, data_version=f"{name}/{same}")
    report = read_json(layout.eval_report)
    passed, why = quality_gate(mlflow.tracking_uri, profile.name, bundle["parity"], report, profile.registry)
    tags = {**version_tags(context.run.run_id, why, bundle, report), **preset_tags(read_summary(layout.study_json))}
    with mlflow.stage(context.run.run_id, profile.name, "registered_model") as log:
        version = register(mlflow.tracking_uri, profile.name, log.run_id, layout.bundle_dir, tags, passed, hashes)
    context.log.info(f"registered {name} version {version}; candidate: {passed} ({why})")
    metadata = {
        "model": name,
        "version": int(version),
        "registered": True,
        "candidate": passed,
        "gate": why,
        "files": md_table(bundle["sizes"], "file", "bytes"),
    }
    return stage.finish(metadata, data_version=f"{name}/{version}")
