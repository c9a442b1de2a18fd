"""Shared pytest fixtures for real infrastructure, as a plugin package.

* :mod:`_fixtures.postgres` — ``postgres_cluster`` (session: a private PostgreSQL cluster started
  with ``initdb`` in a temp dir, one per xdist worker) and ``postgres`` (function: a fresh,
  empty database in it, as a SQLAlchemy URL).
* :mod:`_fixtures.softhsm` — ``softhsm_token`` (session: a real SoftHSM2 token in a temp dir,
  ``SOFTHSM2_CONF`` pointing at it).

Registration: ``tests/conftest.py`` should contain ``pytest_plugins = [*_fixtures.PLUGINS]``
(i.e. ``["_fixtures.postgres", "_fixtures.softhsm"]``). Until it does, test directories that
need them call :func:`register` from their own ``conftest.py``::

    from _fixtures import register


    def pytest_configure(config):
        register(config)

Missing PostgreSQL or SoftHSM2 binaries make the requesting tests *fail* with a message to run
``make test`` (which installs them) — never skip.
"""

from __future__ import annotations

import pytest

PLUGINS = ("_fixtures.postgres", "_fixtures.softhsm")


def register(config: pytest.Config) -> None:
    """Register the fixture plugins (idempotent; a no-op once tests/conftest.py lists them)."""
    for name in PLUGINS:
        if not config.pluginmanager.has_plugin(name):
            config.pluginmanager.import_plugin(name)
