"""Research studies over finpipe models (compression trade-offs); no Dagster."""
