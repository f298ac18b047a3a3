"""The smart-grid pipeline itself: its options (options.py) and its graph (smartgrid.py)."""

import logging as _logging


class _IrrelevantImportWarnings(_logging.Filter):
  """Drops Beam's import-time warnings about Google Cloud extras this project does not use
  (GCS filesystem, apitools): every command printed them before anything else."""

  NOISE = ("Failed to import GCSFileSystem", "apitools not found")

  def filter(self, record: _logging.LogRecord) -> bool:
    return not str(record.msg).startswith(self.NOISE)


# Installed when the package is imported, i.e. before any entry point imports Beam.
for _name in ("", "apache_beam.io.filesystems"):
  _logging.getLogger(_name).addFilter(_IrrelevantImportWarnings())
