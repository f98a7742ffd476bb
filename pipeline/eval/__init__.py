"""Evaluation: bits per byte, lm-eval tasks, HumanEval and its sandbox."""
