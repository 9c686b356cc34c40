"""Turnout: a reverse proxy for zero-downtime blue/green deployments."""

__version__ = "0.1.0"
