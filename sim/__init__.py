"""stalecast's simulator: config, trace schema, metrics, cost model and the SimPy pipeline model.

This package imports no torch; `real/` and `validate/` build on it.
"""
__version__ = "0.1.0"
