"""Scoring generated answers against grounded samples (no Dagster)."""
