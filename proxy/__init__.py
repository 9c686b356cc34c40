"""Turnout: a reverse proxy for zero-downtime blue/green deployments."""

from proxy import native

__version__ = "0.1.0"
__all__ = ["__version__", "native"]
