"""Fixtures shared across test files: ``tiny`` (a tiny training set-up, :mod:`tiny_training`)."""
pytest_plugins = ["tiny_training"]
