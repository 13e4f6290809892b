"""``finpipe serve``: an OpenAI-compatible chat server for the champion (and any kept adapter, and the base model),
grounded in the lake and verifying every number and label it states. No Dagster here."""
