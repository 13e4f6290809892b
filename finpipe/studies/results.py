"""Study results in the lake, so they can be queried with SQL (``finpipe sql "select * from peft_study"``)."""

from __future__ import annotations

import json

import polars as pl

from finpipe.market.lake import transaction


def upsert_rows(lake, table: str, rows: list[dict], key: str) -> int:
    """Replace the rows of ``table`` whose ``key`` matches, in one transaction (a partition rerun replaces
    its row). Nested values (dicts, lists) are stored as JSON text. Returns the table's row count."""
    if not table.isidentifier() or not key.isidentifier():
        raise ValueError(f"not an identifier: {table!r} / {key!r}")
    if not rows:
        raise ValueError(f"no rows to write into {table}")
    flat = [{k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v for k, v in r.items()} for r in rows]
    frame = pl.DataFrame(flat, infer_schema_length=None)
    with lake.connect() as con:
        con.register("incoming_rows", frame.to_arrow())
        try:
            with transaction(con):
                con.execute(f"CREATE TABLE IF NOT EXISTS {table} AS SELECT * FROM incoming_rows LIMIT 0")
                existing = {c[0] for c in con.execute(f"DESCRIBE {table}").fetchall()}
                for name, dtype in zip(frame.columns, con.execute("DESCRIBE incoming_rows").fetchall()):
                    if name not in existing:  # a new metric: widen the table instead of failing the study
                        con.execute(f'ALTER TABLE {table} ADD COLUMN "{name}" {dtype[1]}')
                con.execute(f"DELETE FROM {table} WHERE {key} IN (SELECT {key} FROM incoming_rows)")
                con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM incoming_rows")
                count = con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
        finally:
            con.unregister("incoming_rows")
    return count
