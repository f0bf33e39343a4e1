"""Fake servers that stand in for the outside world in tests (127.0.0.1 only)."""
