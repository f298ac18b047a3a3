"""Beam transforms of the smart-grid pipeline: Kafka source, parsing, batching, sinks, commits."""
