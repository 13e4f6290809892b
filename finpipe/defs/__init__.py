"""The Dagster layer: thin asset, check, resource and schedule definitions over the domain modules."""

import warnings

# Single-run backfills (one run ingests a whole partition range) are a deliberate choice; Dagster
# flags the parameter as beta on every import, which would bury real warnings.
warnings.filterwarnings("ignore", message=r".*`backfill_policy`.*is currently in beta.*")
