"""Turnout: a reverse proxy for zero-downtime blue/green deployments."""

from . import native  # first: it decides whether the compiled data path may be imported

__version__ = "0.1.0"
__all__ = ["__version__", "native"]
