"""Every way of running the smart-grid pipeline: the entry point (``python -m runners.main``),
local rounds and workers, Prism, Flink and Dataflow, drain, and their scripts."""

# Before any runner module imports Beam: the package installs the filter of Beam's
# irrelevant import-time warnings.
import pipelines  # noqa: F401  pylint: disable=unused-import
