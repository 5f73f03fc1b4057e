"""Shared test configuration.

Its presence makes pytest put `tests/` on sys.path, so tests in any subfolder can import
shared helpers such as `vectors` (tests/vectors.py).
"""
