"""The smart-grid pipeline: options, assembly, runner selection and entry points."""
