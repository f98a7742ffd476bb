"""feedback_pairs: users' judgements of served answers as preference pairs for dpo_data."""

from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from assets.metadata import log_to_mlflow, md_table
from assets.stage import Stage
from pipeline.data.feedback import PAIRS_FILE, serving_experiment, update_pairs
from pipeline.release.registry import model_name
from pipeline.reuse import content_hash
from resources import KilnSettings, MLflowTracking


@asset(group_name="data", code_version="2")
def feedback_pairs(context: AssetExecutionContext, kiln: KilnSettings, mlflow: MLflowTracking) -> MaterializeResult:
    """Preference pairs from the judgements users gave served answers (the MLflow traces of
    `kiln-<profile>-serving`): a side-by-side pick gives (chosen, rejected); a down-rated answer
    with a preferred answer gives (preferred, given); an up- and a down-rated answer to the same
    masked prompt pair up. Each pair keeps its trace ids; pairs in which the second PII detector
    still finds personal data, and exact duplicates, are dropped and counted. The file keeps the
    pairs of earlier runs and appends the new ones; its content is the data version, so no new
    judgement leaves dpo_data fresh."""
    profile, layout = kiln.load_with_layout()
    stage = Stage.start(context, layout, None, {"experiment": serving_experiment(model_name(profile.name))}, [])
    folder = layout.feedback_pairs
    # read inside the stage's MLflow context: a tracking server out of reach is retried, not a failure
    with mlflow.stage(context.run.run_id, profile.name, "feedback_pairs") as log:
        stats = update_pairs(mlflow.tracking_uri, model_name(profile.name), folder)
        context.log.info(
            f"feedback_pairs: {stats['new_pairs']} new pairs ({stats['new_by_reason'] or 'none'}) from "
            f"{stats['traces_with_feedback']} judged traces; {stats['pairs']} in all"
        )
        metadata = {
            "path": MetadataValue.path(str(folder / PAIRS_FILE)),
            "pairs": stats["pairs"],
            "new_pairs": stats["new_pairs"],
            "traces_with_feedback": stats["traces_with_feedback"],
            "new_by_reason": md_table(stats["new_by_reason"], "reason", "pairs"),
            "dropped": md_table(stats["dropped"], "reason", "pairs"),
            "dropped_pairs": sum(stats["dropped"].values()),
        }
        log_to_mlflow(log, metadata)
    return stage.finish(metadata, data_version=content_hash(layout.hash_cache, folder / PAIRS_FILE))
