"""raw_corpus and clean_corpus, with their quality gates."""

import itertools

from dagster import AssetCheckResult, AssetExecutionContext, MaterializeResult, MetadataValue, asset, asset_check

from assets.metadata import log_to_mlflow, md_image, md_table
from assets.stage import Stage, StageConfig
from pipeline.charts import bar_chart
from pipeline.data.clean import clean_corpus as run_clean
from pipeline.data.clean import load_stats, read_split
from pipeline.data.ingest import build_raw_corpus
from pipeline.data.pii_scan import pii_left
from pipeline.reuse import content_hash
from resources import KilnSettings, MLflowTracking

PII_SAMPLE_DOCS = 2000


@asset(group_name="data", code_version="3")
def raw_corpus(context: AssetExecutionContext, kiln: KilnSettings, mlflow: MLflowTracking) -> MaterializeResult:
    """Every source of the profile in one normalized JSONL (id, text, source, lang), code and
    prose mixed by the profile's byte ratio."""
    profile, layout = kiln.load_with_layout()
    # Always read again: what the sources hold is only known by reading them (built-in sources,
    # datasets). The data version is the file's content, so the same corpus leaves the rest fresh.
    stage = Stage.start(context, layout, None, profile.corpus, inputs=[])
    corpus, path = profile.corpus, layout.raw_corpus
    stats = build_raw_corpus(
        corpus.sources, path, corpus.max_bytes, corpus.code_share, corpus.max_doc_chars, corpus.seed
    )
    context.log.info(f"raw_corpus: {stats.documents} documents, {stats.bytes:,} bytes -> {path}")
    metadata = {
        "path": MetadataValue.path(str(path)),
        "documents": stats.documents,
        "bytes": stats.bytes,
        "by_kind": MetadataValue.json(stats.by_kind),
        "by_lang": MetadataValue.json(stats.by_lang),
        "by_source": md_table(stats.by_source, "source", "documents"),
        "unreadable_rows": md_table(stats.errors, "problem", "rows"),
    }
    with mlflow.stage(context.run.run_id, profile.name, "raw_corpus") as log:
        log_to_mlflow(log, metadata, params=corpus)
    return stage.finish(metadata, data_version=content_hash(layout.hash_cache, path))


@asset(group_name="data", code_version="3", deps=[raw_corpus])
def clean_corpus(
    context: AssetExecutionContext, config: StageConfig, kiln: KilnSettings, mlflow: MLflowTracking
) -> MaterializeResult:
    """Quality filters, exact and MinHash near-duplicate removal, PII masking and a deterministic
    train/validation split (datatrove). Rejected documents are kept in rejected/ with a reason."""
    profile, layout = kiln.load_with_layout()
    stage = Stage.start(context, layout, config, profile.clean, inputs=[layout.raw_corpus])
    if stage.reused:
        return stage.reuse()
    stats = run_clean([layout.raw_corpus], layout.clean_dir, profile.clean)
    context.log.info(f"clean_corpus: kept {stats.kept_documents} of {stats.input_documents}; dropped {stats.dropped}")
    chart = bar_chart(stats.dropped, "Documents dropped, by reason")
    metadata = {
        "path": MetadataValue.path(str(layout.clean_splits)),
        "input_documents": stats.input_documents,
        "kept_documents": stats.kept_documents,
        "kept_bytes": stats.kept_bytes,
        "kept_by_lang": MetadataValue.json(stats.by_lang),
        "train_documents": stats.splits["train"],
        "validation_documents": stats.splits["validation"],
        "dropped": md_table(stats.dropped, "reason", "documents"),
        "pii_masked": md_table(stats.pii, "kind", "masks"),
        "dropped_chart": md_image(chart, "dropped by reason"),
    }
    with mlflow.stage(context.run.run_id, profile.name, "clean_corpus") as log:
        log_to_mlflow(log, metadata, params=profile.clean, files=[layout.clean_stats], images={"dropped.png": chart})
    return stage.finish(metadata)


@asset_check(asset=clean_corpus, blocking=True, description="The clean corpus has training and validation documents.")
def clean_corpus_not_empty(kiln: KilnSettings) -> AssetCheckResult:
    splits = load_stats(kiln.layout.clean_dir)["splits"]
    return AssetCheckResult(passed=splits["train"] > 0 and splits["validation"] > 0, metadata=splits)


@asset_check(
    asset=clean_corpus,
    blocking=True,
    description="Neither the masker's patterns nor an independent scanner find personal data in a clean-corpus sample.",
)
def clean_corpus_pii_free(kiln: KilnSettings) -> AssetCheckResult:
    clean = kiln.layout.clean_splits
    docs = itertools.islice(
        itertools.chain(read_split(clean, "train"), read_split(clean, "validation")), PII_SAMPLE_DOCS
    )
    found = [(d["id"], kind, detector) for d in docs for detector, kind, _ in pii_left(d["text"])]
    return AssetCheckResult(
        passed=not found,
        metadata={"documents_checked": PII_SAMPLE_DOCS, "findings": MetadataValue.json(found[:20])},
    )
