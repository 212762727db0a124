"""Shared test setup. Fixtures for real components (SeaweedFS, sshd, Postgres, Redis, the fake vast.ai
API) live in `tests/support/fixtures_*.py`, one module per component, and are all registered here."""

import pathlib

_SUPPORT = pathlib.Path(__file__).parent / "support"
pytest_plugins = sorted(f"tests.support.{p.stem}" for p in _SUPPORT.glob("fixtures_*.py"))
