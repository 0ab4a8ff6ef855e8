"""How logsink's modules depend on each other: no import cycle, the sans-io parts load without the compiled core."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "logsink"
# Files over this many lines are the next split to make (issue 9: "no source file over ~700 lines").
MAX_LINES = 700
# logsink/bench.py: branch shape-bench moves its harness to benchmarks/ (drop this once merged).
TOO_LONG_FOR_NOW: set[str] = set()  # none: every module is under MAX_LINES


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        isinstance(test, ast.Name) and test.id == "TYPE_CHECKING" or isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The logsink modules ``path`` imports, wherever the import statement is (top level or inside a function).

    ``from logsink.x import y`` counts as importing ``logsink.x.y`` when that is a module, else ``logsink.x``.
    Not counted: ``if TYPE_CHECKING:`` blocks (never run, so they cannot make an import cycle at run
    time), and the parent packages Python imports implicitly before a submodule (a package's
    ``__init__`` importing its own submodules is the normal direction; a submodule importing a name
    from its package's ``__init__`` is written out, and counted)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    skip: set[int] = set()
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if is_type_checking_block(node):
            skip.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found.update(n for n in names if n in modules and n != me)
    return found


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, modules) for f in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        color[node] = GREY
        stack.append(node)
        for dep in sorted(graph[node]):
            if color[dep] == GREY:
                return stack[stack.index(dep):] + [dep]
            if color[dep] == WHITE and (cycle := visit(dep)):
                return cycle
        stack.pop()
        color[node] = BLACK
        return None

    for node in sorted(graph):
        if color[node] == WHITE and (cycle := visit(node)):
            return cycle
    return None


class TestImportGraph:
    def test_the_graph_sees_the_imports_it_should(self):
        """The graph builder finds known edges (so an empty graph cannot pass the cycle test)."""
        graph = import_graph()
        assert "logsink.protocol" in graph["logsink.config"]
        assert "logsink.daemon.server" in graph["logsink.daemon"]
        assert "logsink.client" in graph["logsink"]  # the lazy import inside __getattr__ counts too

    def test_find_cycle_reports_a_cycle(self):
        """The cycle finder names the modules of a cycle it is shown."""
        assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
        assert find_cycle({"a": {"b"}, "b": set()}) is None

    def test_logsink_modules_import_no_cycle(self):
        """No logsink module imports, directly or through others, itself (imports inside functions included)."""
        cycle = find_cycle(import_graph())
        assert cycle is None, "import cycle: " + " -> ".join(cycle)

    def test_no_module_is_over_the_line_budget(self):
        """Every module of the package stays under the line budget, so each can be read in one sitting."""
        long = {str(f.relative_to(PACKAGE)): n for f in PACKAGE.rglob("*.py")
                if (n := len(f.read_text().splitlines())) > MAX_LINES and str(f.relative_to(PACKAGE)) not in TOO_LONG_FOR_NOW}
        assert not long, f"modules over {MAX_LINES} lines: {long}"


def import_without_core(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where ``import logsink._core`` fails, as on a machine without the build."""
    prelude = "import sys; sys.modules['logsink._core'] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=60,
                          cwd=PACKAGE.parent)


class TestWithoutTheCore:
    def test_the_core_is_really_blocked(self):
        """The harness works: with the core blocked, the client cannot be imported."""
        res = import_without_core("import logsink.client")
        assert res.returncode != 0 and "native core is not built" in res.stderr, res.stderr

    @pytest.mark.parametrize("module", ["logsink.protocol", "logsink.config", "logsink.access"])
    def test_sans_io_module_imports_without_the_core(self, module):
        """The protocol and the config (and the access rules they use) import without the compiled core."""
        res = import_without_core(f"import {module}\nassert 'logsink._native' not in sys.modules, sorted(sys.modules)")
        assert res.returncode == 0, res.stderr

    def test_config_with_forwards_loads_without_the_core(self):
        """A config with forwards, a listen address and access rules is parsed and checked without the core."""
        res = import_without_core(
            "from logsink.config import load\n"
            "cfg = load(None, {'forward_cli': ['app=tcp://127.0.0.1:514,relp,window=8'], 'listen': ['tcp://127.0.0.1:7000']})\n"
            "assert cfg.forwards['app'][0].framing == 'relp' and cfg.forwards['app'][0].window == 8\n"
            "assert 'logsink._native' not in sys.modules\n")
        assert res.returncode == 0, res.stderr

    def test_version_and_lazy_client_names(self):
        """``import logsink`` gives __version__ without the core; Client is loaded only when asked for."""
        res = import_without_core(
            "import logsink\nassert logsink.__version__\nassert 'logsink.client' not in sys.modules\n"
            "try:\n    logsink.Client\nexcept ImportError as exc:\n    assert 'native core' in str(exc)\nelse:\n    raise SystemExit('Client without the core?')\n")
        assert res.returncode == 0, res.stderr


class TestConfigMatchesTheCore:
    def test_relp_window_limits_match_the_c_header(self):
        """The RELP window limits the config checks are the ones native/ls_forward.h defines."""
        from logsink._native import lib
        from logsink.config import RELP_WINDOW_DEFAULT, RELP_WINDOW_MAX

        assert (RELP_WINDOW_DEFAULT, RELP_WINDOW_MAX) == (lib.LS_RELP_WINDOW_DEFAULT, lib.LS_RELP_WINDOW_MAX)

    def test_every_framing_name_has_a_c_code(self):
        """Each framing the config accepts maps to a distinct C framing."""
        from logsink.config import FRAMINGS
        from logsink.forward.forwarder import FRAMING_CODES

        assert set(FRAMING_CODES) == set(FRAMINGS) and len(set(FRAMING_CODES.values())) == len(FRAMINGS)
