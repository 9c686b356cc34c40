"""Helpers shared by several test modules, by theme. Test modules import from here, never
from one another; the fixtures among them are registered for the suite in conftest.py."""
