"""Video collection -> Parquet shards for svt-ray (`python -m data_prep`, `svt-ray prep`)."""

from data_prep.cli import main

__all__ = ["main"]
