"""Datasets in the layouts other tools read: plain Parquet lists, trainer layouts, and back."""
