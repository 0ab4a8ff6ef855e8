"""Fixtures for the fuzz targets: one live daemon per test module (``live``), and the hang watchdog
turned off for long runs (a long run's test takes hours; every wait in the harness is bounded)."""

from __future__ import annotations

import faulthandler

import pytest
from conftest import WATCHDOG_SECONDS

from fuzz.harness import LONG, start_live_daemon


@pytest.fixture(autouse=True)
def _watchdog():
    """Overrides the suite's watchdog: the same 240 s per test in CI, none in a long run."""
    if LONG:
        yield
        return
    faulthandler.dump_traceback_later(WATCHDOG_SECONDS, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def live(request, tmp_path_factory):
    """The module's daemon (with a TCP listener if the module sets ``FUZZ_TCP = True``); teardown
    SIGTERMs it and requires exit 0."""
    name = request.module.__name__.rsplit(".", 1)[-1]
    ld = start_live_daemon(tmp_path_factory.mktemp(name), tcp=getattr(request.module, "FUZZ_TCP", False))
    yield ld
    ld.d.close()
