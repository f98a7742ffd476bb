"""Release: GGUF export and benchmark, model card, MLflow registry."""
