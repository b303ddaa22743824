"""Evaluator plugins (lm-evaluation-harness adapter and friends) live here."""
