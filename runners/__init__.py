"""Every way of running the smart-grid pipeline: the entry point (``python -m runners.main``),
local rounds and workers, Prism, Flink and Dataflow, drain, and their scripts."""
