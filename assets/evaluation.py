"""eval_report and the eval gate before `candidate`."""

from dagster import AssetCheckResult, AssetExecutionContext, MaterializeResult, MetadataValue, asset, asset_check

from assets.corpus import clean_corpus
from assets.metadata import log_to_mlflow, md_image, table
from assets.post_training import dpo_model, sft_model
from assets.release import gguf_benchmark
from assets.stage import Stage, StageConfig
from assets.training import base_model
from pipeline.charts import metric_panels
from pipeline.data.clean import read_split
from pipeline.errors import KilnError
from pipeline.eval.evaluation import (
    LOWER_IS_BETTER,
    evaluate_all,
    figure_rows,
    flat_metrics,
    gate,
    metric_table,
    rounded_metrics,
)
from pipeline.io import read_json
from pipeline.release.registry import SHIPPED, production_metrics
from resources import KilnSettings, MLflowTracking


# After gguf_benchmark, not beside it: two CPU-heavy steps at once would skew the benchmark's
# speed figures, and a GGUF that failed parity is not worth evaluating.
@asset(group_name="evaluation", code_version="8", deps=[base_model, sft_model, dpo_model, gguf_benchmark, clean_corpus])
def eval_report(
    context: AssetExecutionContext, config: StageConfig, kiln: KilnSettings, mlflow: MLflowTracking
) -> MaterializeResult:
    """base, SFT and DPO side by side: held-out bits per byte, lm-eval (kiln's tasks from held-out
    code, and the profile's standard tasks where their data loads), HumanEval pass@k in the
    sandbox; HumanEval through the shipped quantized GGUF too."""
    profile, layout = kiln.load_with_layout()
    s = profile.eval
    models = {m: layout.model_dir(m) for m in ("base", "sft", "dpo")}
    gguf = (f"{SHIPPED}_{s.gguf_file}", layout.gguf(s.gguf_file)) if s.gguf_file else None
    evaluated = [*models.values(), *([gguf[1]] if gguf else [])]
    for path in evaluated:
        if not path.exists():
            raise KilnError(f"{path}: not there yet; materialize the assets upstream of eval_report first")
    settings = {"eval": s, "seq_len": profile.pretrain.seq_len}
    stage = Stage.start(context, layout, config, settings, [*evaluated, layout.clean_splits])
    if stage.reused:
        return stage.reuse()
    validation = list(read_split(layout.clean_splits, "validation"))
    with mlflow.stage(context.run.run_id, profile.name, "eval_report") as log:
        report = evaluate_all(
            models, validation, layout.eval_dir, s, gguf, profile.pretrain.seq_len, say=context.log.info
        )
        chart = metric_panels(metric_table(report), f"eval_report ({profile.name})", LOWER_IS_BETTER, report["chance"])
        metadata = {
            "path": MetadataValue.path(str(layout.eval_report)),
            "table": table(*figure_rows(report)),  # value ± standard error, and n, per metric
            "chart": md_image(chart, "evaluation"),
            **rounded_metrics(report, list(report["models"])),
            **{f"seconds.{part}": t for part, t in report["seconds"].items()},
        }
        files = [layout.eval_report, layout.eval_markdown, layout.humaneval_samples]
        exact = {**metadata, **flat_metrics(report, list(report["models"]))}  # MLflow keeps every digit
        log_to_mlflow(log, exact, params=s, files=files, images={"eval.png": chart})
    return stage.finish(metadata)


@asset_check(
    asset=eval_report,
    blocking=True,
    description="The eval gate before `candidate`: the DPO model no worse than production's (bits per byte within "
    "registry.max_regression, scores within registry.max_score_drop), its GGUF's HumanEval within max_score_drop.",
)
def eval_gate(kiln: KilnSettings, mlflow: MLflowTracking) -> AssetCheckResult:
    profile, layout = kiln.load_with_layout()
    report = read_json(layout.eval_report)
    r, production = profile.registry, production_metrics(mlflow.tracking_uri, profile.name)
    passed, lines = gate(report, SHIPPED, production, r.max_regression, r.max_score_drop, report["quantized"])
    comparisons = MetadataValue.md("\n".join(f"- {x}" for x in lines))
    return AssetCheckResult(passed=passed, metadata={"comparisons": comparisons})
