"""The package namespace: after a bare ``import logsink`` every public submodule is reachable as an
attribute (imported on first use), and integrations nobody asked for are not imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PUBLIC_SUBMODULES = ("structlog", "logging", "pipe", "aio", "client", "protocol", "config", "cli", "daemon",
                     "access", "errors", "files", "forward", "bench")


def run_fresh(code: str) -> str:
    """Run ``code`` in a new interpreter (a clean ``sys.modules``) and return its stdout."""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, f"exit {res.returncode}:\n{res.stdout}\n{res.stderr}"
    return res.stdout


class TestLazySubmodules:
    def test_bare_import_does_not_import_structlog_or_the_integrations(self):
        """``import logsink`` alone leaves structlog, logsink.structlog and logsink.logging unimported (users of Client pay nothing for them)."""
        out = run_fresh("import sys, json, logsink; print(json.dumps(sorted(m for m in sys.modules "
                        "if m in ('structlog', 'logsink.structlog', 'logsink.logging', 'logsink.daemon', 'logsink.cli'))))")
        assert json.loads(out) == []

    def test_structlog_integration_is_reachable_from_the_package(self):
        """``logsink.structlog.configure`` works after only ``import logsink`` (no AttributeError), and imports structlog then."""
        out = run_fresh("import sys, logsink; f = logsink.structlog.configure; "
                        "print(callable(f), 'structlog' in sys.modules, logsink.structlog.__name__)")
        assert out.split() == ["True", "True", "logsink.structlog"]

    def test_logging_handler_is_reachable_from_the_package(self):
        """``logsink.logging.LogsinkHandler`` is the handler class after only ``import logsink``."""
        out = run_fresh("import logsink, logging; h = logsink.logging.LogsinkHandler; "
                        "print(issubclass(h, logging.Handler), logsink.logging.__name__)")
        assert out.split() == ["True", "logsink.logging"]

    @pytest.mark.parametrize("name", PUBLIC_SUBMODULES)
    def test_every_public_submodule_is_an_attribute(self, name):
        """Each public submodule is ``logsink.<name>`` after a bare import, is the module ``import logsink.<name>`` gives, and is listed by dir()."""
        out = run_fresh(f"import importlib, logsink; m = logsink.{name}; "
                        f"print(m is importlib.import_module('logsink.{name}'), '{name}' in dir(logsink))")
        assert out.split() == ["True", "True"]

    def test_unknown_attribute_still_raises_attribute_error(self):
        """A name that is neither an attribute nor a public submodule raises AttributeError naming it (hasattr stays honest)."""
        out = run_fresh("import logsink\ntry:\n    logsink.nosuchthing\nexcept AttributeError as e:\n    print('AE', e)\n"
                        "print(hasattr(logsink, '_core_private_x'))")
        assert "AE" in out and "nosuchthing" in out and out.split()[-1] == "False"

    def test_client_and_async_client_are_the_classes_loaded_on_first_use(self):
        """``logsink.Client`` and ``logsink.AsyncClient`` are the classes from client.py and aio.py, loaded on first use
        (so ``import logsink`` needs no compiled core)."""
        out = run_fresh("import sys, logsink; before = 'logsink._core' in sys.modules; "
                        "import logsink.client, logsink.aio; "
                        "print(before, logsink.Client is logsink.client.Client, logsink.AsyncClient is logsink.aio.AsyncClient)")
        assert out.split() == ["False", "True", "True"]

    def test_the_lazy_list_names_every_public_module_file(self):
        """Every ``logsink/<name>.py`` without a leading underscore is in the package's lazy list (a new module is reachable too)."""
        import logsink

        files = {p.stem for p in (ROOT / "logsink").glob("*.py") if not p.stem.startswith("_")}
        files |= {p.parent.name for p in (ROOT / "logsink").glob("*/__init__.py")}  # subpackages: daemon, forward
        assert files == set(logsink._SUBMODULES) == set(PUBLIC_SUBMODULES)
