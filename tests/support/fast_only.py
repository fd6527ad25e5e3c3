"""A pytest plugin for mutation runs (`scripts/mutation`): only the fast tests.

- Tests that start the daemon (mosquitto, the STT double, a FIFO microphone)
  are deselected: a mutation run must fit in minutes, and the guarantees of
  the core modules are checked by their unit tests.
- Hypothesis runs derandomized and without its example database, so that a
  mutant is killed, or survives, the same way on every run.

Load it with `-p tests.support.fast_only` (pyproject.toml's [tool.mutmut]
does); the ordinary test run does not.
"""

from __future__ import annotations

import pytest
from hypothesis import settings

# Fixtures that start real parts (see tests/conftest.py).
DAEMON_FIXTURES = frozenset({"stack", "broker", "stt", "subscriber", "mic", "home"})

settings.register_profile("mutation", derandomize=True, database=None, deadline=None,
                          print_blob=False)


def pytest_configure(config: pytest.Config) -> None:
    settings.load_profile("mutation")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    slow = [item for item in items
            if DAEMON_FIXTURES & set(getattr(item, "fixturenames", ()))]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item not in slow]
