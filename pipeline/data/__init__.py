"""Corpus stages: ingest, quality filters, cleaning, PII masking, post-training data."""
