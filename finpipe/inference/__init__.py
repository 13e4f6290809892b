"""Inference: ground a question in the lake's latest facts, and export a merged model."""
