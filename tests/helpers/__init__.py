"""Shared pieces of the tests: reference implementations, tiny models, CLI and browser helpers."""
