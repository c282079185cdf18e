"""The single version string, read by packaging and by the greeting."""

__version__ = "0.1.0"
