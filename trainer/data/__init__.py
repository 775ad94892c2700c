"""Annotated data: CVAT export readers, in-memory records, splits, the synthetic generator, data options."""
