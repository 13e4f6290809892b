"""Market statistics derived from the clean price table (Polars; no Dagster)."""
