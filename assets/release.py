"""gguf_model, gguf_benchmark (with the parity gate) and registered_model."""

import json

from dagster import AssetCheckResult, AssetExecutionContext, MaterializeResult, MetadataValue, asset, asset_check

from assets.corpus import clean_corpus
from assets.metadata import md_image, md_table, record
from assets.post_training import dpo_model
from pipeline.charts import gguf_comparison
from pipeline.data.clean import read_split
from pipeline.eval.evaluation import flat_metrics
from pipeline.io import write_json
from pipeline.release.gguf_bench import benchmark_all, markdown_table
from pipeline.release.gguf_export import export_all
from pipeline.release.model_card import build_bundle
from pipeline.release.registry import EVAL_TAG, SHIPPED, quality_gate, register
from resources import KilnSettings, MLflowTracking


@asset(group_name="release", code_version="1", deps=[dpo_model])
def gguf_model(context: AssetExecutionContext, kiln: KilnSettings, mlflow: MLflowTracking) -> MaterializeResult:
    """The final checkpoint as GGUF F16 (our converter on the `gguf` library: tokenizer, chat
    template and hyper-parameters included), then Q8_0 and Q4_K_M from llama.cpp's quantizer."""
    profile, out = kiln.load(), kiln.stage_dir("gguf_model")
    files = export_all(kiln.stage_dir("dpo_model") / "model", out, f"kiln-{profile.name}", context.run_id[:8])
    write_json(out / "files.json", {k: str(v) for k, v in files.items()})
    metadata = {"path": MetadataValue.path(str(out)), **{f"{k}_bytes": p.stat().st_size for k, p in files.items()}}
    with mlflow.stage(context.run_id, profile.name, "gguf_model") as log:
        record(log, metadata)
    return MaterializeResult(metadata=metadata)


@asset(group_name="release", code_version="1", deps=[gguf_model, clean_corpus])
def gguf_benchmark(context: AssetExecutionContext, kiln: KilnSettings, mlflow: MLflowTracking) -> MaterializeResult:
    """llama.cpp on every GGUF file: tokenizer and perplexity parity against the HF model,
    pp512/tg128 tokens/s, time to first token, latency percentiles, peak memory per context,
    share of the memory-bandwidth bound, cost per million tokens."""
    profile, out = kiln.load(), kiln.stage_dir("gguf_benchmark")
    files = json.loads((kiln.stage_dir("gguf_model") / "files.json").read_text())
    validation = [r["text"] for r in read_split(kiln.stage_dir("clean_corpus") / "clean", "validation")]
    report = benchmark_all(files, kiln.stage_dir("dpo_model") / "model", validation, profile.gguf)
    write_json(out / "benchmark.json", report)
    r = report["files"]
    chart = gguf_comparison(r)
    metadata = {
        "path": MetadataValue.path(str(out / "benchmark.json")),
        "table": MetadataValue.md(markdown_table(r)),
        "comparison": md_image(chart, "GGUF comparison"),
        "machine_bandwidth_gb_s": report["machine_bandwidth_gb_s"],
        **{f"{k}_tg128_tokens_per_s": v["tg128_tokens_per_s"]["median"] for k, v in r.items()},
        **{f"{k}_pp512_tokens_per_s": v["pp512_tokens_per_s"]["median"] for k, v in r.items()},
        **{f"{k}_size_bytes": v["size_bytes"] for k, v in r.items()},
        **{f"{k}_perplexity_rel_diff": v["parity"]["perplexity_rel_diff"] for k, v in r.items()},
    }
    with mlflow.stage(context.run_id, profile.name, "gguf_benchmark") as log:
        record(log, metadata, params=profile.gguf, files=[out / "benchmark.json"], images={"gguf.png": chart})
    return MaterializeResult(metadata=metadata)


@asset_check(
    asset=gguf_benchmark,
    blocking=True,
    description="GGUF tokenization equals HF's; F16 perplexity within 1% of HF's, Q8_0 within 3%.",
)
def gguf_parity(kiln: KilnSettings) -> AssetCheckResult:
    report = json.loads((kiln.stage_dir("gguf_benchmark") / "benchmark.json").read_text())
    parity = {k: v["parity"] for k, v in report["files"].items()}
    return AssetCheckResult(
        passed=all(p["passed"] for p in parity.values()),
        metadata={k: MetadataValue.json(p) for k, p in parity.items()},
    )


@asset(group_name="release", code_version="1", deps=[gguf_benchmark, "eval_report"])  # by key: assets.evaluation
def registered_model(context: AssetExecutionContext, kiln: KilnSettings, mlflow: MLflowTracking) -> MaterializeResult:
    """A model version in the MLflow registry (`kiln-<profile>`): the GGUF files, the merged HF
    checkpoint, the model card and reports, a sha256 tag per file; alias `candidate` when the
    quality gate passes (GGUF parity, and the eval gate: no regression past production)."""
    profile = kiln.load()
    work = kiln.stage_dir("registered_model").parent
    bundle_dir = kiln.stage_dir("registered_model") / "bundle"
    table = markdown_table(json.loads((kiln.stage_dir("gguf_benchmark") / "benchmark.json").read_text())["files"])
    bundle = build_bundle(work, profile, context.run_id, bundle_dir, table)
    report = json.loads((kiln.stage_dir("eval_report") / "report.json").read_text())
    passed, why = quality_gate(mlflow.tracking_uri, profile.name, bundle["parity"], report, profile.registry)
    evals = flat_metrics(report, [SHIPPED, report["quantized"]] if report["quantized"] else [SHIPPED])
    tags = {
        "dagster_run_id": context.run_id,
        "gate": why,
        **{f"metric.{k}": f"{v:.6g}" for k, v in bundle["metrics"].items() if isinstance(v, int | float)},
        **{f"{EVAL_TAG}{k}": f"{v:.6g}" for k, v in evals.items()},
        **{f"size.{k}": str(v) for k, v in bundle["sizes"].items()},
    }
    with mlflow.stage(context.run_id, profile.name, "registered_model") as log:
        version = register(mlflow.tracking_uri, profile.name, log.run_id, bundle_dir, tags, passed)
    context.log.info(f"registered kiln-{profile.name} version {version}; candidate: {passed} ({why})")
    return MaterializeResult(
        metadata={
            "model": f"kiln-{profile.name}",
            "version": int(version),
            "candidate": passed,
            "gate": why,
            "files": md_table(bundle["sizes"], "file", "bytes"),
        }
    )
