"""Alignment of one model's top-k distributions onto another model's tokens and vocabulary."""
