"""Aggregation rules as pure functions and folds: the exact weighted mean, LoRA factor
rules (factors, product, HetLoRA), and Byzantine-robust rules."""
