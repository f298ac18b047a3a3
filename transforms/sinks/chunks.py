"""Request chunks: consecutive rows grouped under a row count and a byte size.

One grouping rule for both BigQuery write methods (insertAll requests in bigquery.py,
Storage Write API append requests in bigquery_storage.py), in a module of its own so
neither imports the other for it.
"""

from __future__ import annotations

from collections.abc import Sequence


def chunk_indexes(sizes: Sequence[int], max_rows: int, max_bytes: int) -> list[list[int]]:
  """Consecutive index groups with at most max_rows rows and max_bytes bytes each.

  A row larger than max_bytes travels alone (BigQuery then refuses it, and only it).
  """
  if max_rows < 1 or max_bytes < 1:
    raise ValueError(f"max_rows and max_bytes must be >= 1, got {max_rows}, {max_bytes}")
  chunks: list[list[int]] = []
  current: list[int] = []
  current_bytes = 0
  for i, size in enumerate(sizes):
    if current and (len(current) >= max_rows or current_bytes + size > max_bytes):
      chunks.append(current)
      current, current_bytes = [], 0
    current.append(i)
    current_bytes += size
  if current:
    chunks.append(current)
  return chunks
