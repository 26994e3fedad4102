"""Datasets in the canonical form (Parquet folder + manifest) and the causal sample builder."""
