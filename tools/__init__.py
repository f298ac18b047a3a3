"""Operator tools around the pipeline: produce and demo events, ``audit`` and ``chaos`` that
prove its promise from the outside, and offset ranges."""
