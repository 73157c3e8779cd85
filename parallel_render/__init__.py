"""Render the independent parts of a Django page in parallel worker processes."""

__version__ = "0.1.0"
