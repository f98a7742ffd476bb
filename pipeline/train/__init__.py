"""Training stages: tokenizer, pretraining, LoRA helpers, SFT, DPO."""
