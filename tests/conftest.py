"""Shared fixtures. Object-store servers live in servers.py; the compile seed in seed.py."""

pytest_plugins = ("servers",)
