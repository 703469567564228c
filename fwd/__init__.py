"""fwd: a TCP relay hub. See docs/ARCHITECTURE.md for where each piece lives."""

__version__ = "0.1.0"
