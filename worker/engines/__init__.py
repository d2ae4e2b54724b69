"""Inference engines. Each turns a tokenized request into a stream of text deltas."""
