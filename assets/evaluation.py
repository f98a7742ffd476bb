"""eval_report and the eval gate before `candidate`."""

import json

from dagster import AssetCheckResult, AssetExecutionContext, MaterializeResult, MetadataValue, asset, asset_check

from assets.corpus import clean_corpus
from assets.metadata import md_image, record
from assets.post_training import dpo_model, sft_model
from assets.release import gguf_benchmark
from assets.training import base_model
from pipeline.charts import metric_panels
from pipeline.data.clean import read_split
from pipeline.errors import KilnError
from pipeline.eval.evaluation import LOWER_IS_BETTER, evaluate_all, flat_metrics, gate, markdown_table, metric_table
from pipeline.release.registry import SHIPPED, production_metrics
from resources import KilnSettings, MLflowTracking


# After gguf_benchmark, not beside it: two CPU-heavy steps at once would skew the benchmark's
# speed figures, and a GGUF that failed parity is not worth evaluating.
@asset(group_name="evaluation", code_version="1", deps=[base_model, sft_model, dpo_model, gguf_benchmark, clean_corpus])
def eval_report(context: AssetExecutionContext, kiln: KilnSettings, mlflow: MLflowTracking) -> MaterializeResult:
    """base, SFT and DPO side by side: held-out bits per byte, lm-eval (kiln's tasks from held-out
    code, and the profile's standard tasks where their data loads), HumanEval pass@k in the
    sandbox; HumanEval through the shipped quantized GGUF too."""
    profile, out = kiln.load(), kiln.stage_dir("eval_report")
    s = profile.eval
    models = {m: kiln.stage_dir(f"{m}_model") / "model" for m in ("base", "sft", "dpo")}
    gguf_file = kiln.stage_dir("gguf_model") / f"kiln-{profile.name}-{s.gguf_file}.gguf"
    gguf = (f"dpo_{s.gguf_file}", gguf_file) if s.gguf_file else None
    for path in [*models.values(), *([gguf_file] if gguf else [])]:
        if not path.exists():
            raise KilnError(f"{path}: not there yet; materialize the assets upstream of eval_report first")
    validation = list(read_split(kiln.stage_dir("clean_corpus") / "clean", "validation"))
    with mlflow.stage(context.run_id, profile.name, "eval_report") as log:
        report = evaluate_all(models, validation, out, s, gguf, profile.pretrain.seq_len, say=context.log.info)
        chart = metric_panels(metric_table(report), f"eval_report ({profile.name})", LOWER_IS_BETTER, report["chance"])
        metadata = {
            "path": MetadataValue.path(str(out / "report.json")),
            "table": MetadataValue.md(markdown_table(report)),
            "chart": md_image(chart, "evaluation"),
            **flat_metrics(report, list(report["models"])),
            **{f"seconds.{part}": t for part, t in report["seconds"].items()},
        }
        record(
            log, metadata, params=s, files=[out / "report.json", out / "report.md", out / "humaneval"],
            images={"eval.png": chart},
        )  # fmt: skip
    return MaterializeResult(metadata=metadata)


@asset_check(
    asset=eval_report,
    blocking=True,
    description="The eval gate before `candidate`: the DPO model no worse than production's (bits per byte within "
    "registry.max_regression, scores within registry.max_score_drop), its GGUF's HumanEval within max_score_drop.",
)
def eval_gate(kiln: KilnSettings, mlflow: MLflowTracking) -> AssetCheckResult:
    profile = kiln.load()
    report = json.loads((kiln.stage_dir("eval_report") / "report.json").read_text())
    r, production = profile.registry, production_metrics(mlflow.tracking_uri, profile.name)
    passed, lines = gate(report, SHIPPED, production, r.max_regression, r.max_score_drop, report["quantized"])
    comparisons = MetadataValue.md("\n".join(f"- {x}" for x in lines))
    return AssetCheckResult(passed=passed, metadata={"comparisons": comparisons})
