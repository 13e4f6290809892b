"""Market data domain: universes, calendars, price sources, validation and the DuckDB lake.

Nothing here imports Dagster.
"""
