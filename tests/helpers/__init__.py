"""Helpers shared by the test modules (fixtures are offered through tests/conftest.py)."""
