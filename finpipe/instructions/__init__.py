"""Grounded chat instruction datasets built from market statistics (no Dagster)."""
