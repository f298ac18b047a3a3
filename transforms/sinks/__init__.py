"""Sinks: one contract (``base.WriteBatches`` over a ``Store``), SQLite and BigQuery stores."""
