"""Operator tools that prove the pipeline's promise from the outside: ``audit`` and ``chaos``."""
