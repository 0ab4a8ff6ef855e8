"""The README's fenced code blocks run as written, against a live daemon.

Every block is extracted and tested by default: ``python`` blocks run with this interpreter, ``sh``
blocks one command at a time (each ``&&`` step separately) with ``.venv/bin/`` mapped to this
interpreter's environment, ``toml`` blocks load as a daemon config, ``text`` blocks (the usage
synopsis) name only flags the CLI has. The default socket the README relies on is the test daemon's
(``LOGSINK_SOCKET``). What cannot run in a test is in SKIPPED below, by exact text, with the reason.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from lsk_helpers import wait_for

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BIN = Path(sys.executable).parent  # the environment running the tests stands in for the README's .venv
SNIPPET_TIMEOUT = 60

# Steps (exact text after ``.venv/bin/`` is left as written) that are not run, and why. A step not
# listed here is run; an entry that no longer matches the README fails test_skip_list_is_current.
SKIPPED = {
    "python3 -m venv .venv": "creates the environment this suite already runs in",
    ".venv/bin/pip install -q -e .": "installs this checkout, which the suite runs from (the wheel build is tested in test_wheel.py)",
    ".venv/bin/pip install -q -e '.[test]'": "installs this checkout with the test extras, which the suite runs from",
    ".venv/bin/pytest": "runs the suite this test is part of",
    ".venv/bin/pip wheel . -w dist": "builds wheels: tests/test_wheel.py runs it in a copy of the tree",
    ".venv/bin/pip install --no-index --find-links dist logsink": "tests/test_wheel.py installs from such a dist/ into a fresh venv",
    "tail -F logs/app.log": "follows the file until interrupted",
    "journalctl -f | .venv/bin/logsink pipe journal": "follows the journal until interrupted",
    "tail -F /var/log/x | .venv/bin/logsink pipe x": "follows a file until interrupted",
}
# Steps that start the daemon and run until stopped: run in the background, fed a record, stopped.
DAEMON_STEPS = {".venv/bin/logsink serve"}
# ``logsink`` as the command word of a step (not .venv/bin/logsink, not a package name argument).
BARE_LOGSINK = re.compile(r"(^|[|;&(]\s*)logsink(\s|$)")


@dataclass(frozen=True)
class Snippet:
    lang: str
    line: int  # 1-based line of the README where the code starts
    code: str

    @property
    def id(self) -> str:
        first = self.code.strip().splitlines()[0] if self.code.strip() else ""
        return f"L{self.line}-{self.lang or 'untagged'}-{first[:40]}"


def readme_blocks(text: str | None = None) -> list[Snippet]:
    """Every fenced block of the README: its language tag, first line number and code."""
    text = README.read_text() if text is None else text
    out, lang, start, body = [], None, 0, []
    for n, line in enumerate(text.splitlines(), 1):
        if lang is None:
            m = re.match(r"^```\s*([\w+-]*)\s*$", line)
            if m:
                lang, start, body = m.group(1), n + 1, []
        elif line.startswith("```"):
            out.append(Snippet(lang, start, "\n".join(body) + "\n"))
            lang = None
        else:
            body.append(line)
    assert lang is None, f"README.md: the code block opened at line {start - 1} is never closed"
    return out


def shell_steps(snippet: Snippet) -> list[Snippet]:
    """A shell block as its steps: one per line (continuations joined), each line split at ``&&``."""
    steps = []
    lines = snippet.code.replace("\\\n", " ").splitlines()
    for i, line in enumerate(lines):
        line = line.split(" # ")[0].strip() if not line.lstrip().startswith("#") else ""
        for step in (s.strip() for s in line.split("&&")):
            if step:
                steps.append(Snippet("sh", snippet.line + i, step))
    return steps


def venv_mapped(cmd: str) -> str:
    """``cmd`` with ``.venv/bin/X`` pointing at this interpreter's environment (python: this interpreter)."""
    def repl(m: re.Match) -> str:
        name = m.group(1)
        if name in ("python", "python3"):
            return sys.executable
        exe = BIN / name
        assert exe.exists(), f"README runs .venv/bin/{name}, which is not in {BIN}: is the package installed there?"
        return str(exe)
    return re.sub(r"\.venv/bin/([\w.-]+)", repl, cmd)


ALL = readme_blocks()
PYTHON = [s for s in ALL if s.lang == "python"]
SHELL = [step for s in ALL if s.lang in ("sh", "shell", "bash") for step in shell_steps(s)]
TOML = [s for s in ALL if s.lang == "toml"]
TEXT = [s for s in ALL if s.lang == "text"]
KNOWN_LANGS = {"python", "sh", "shell", "bash", "toml", "text"}


def snippet_env(d) -> dict[str, str]:
    return {**os.environ, "LOGSINK_SOCKET": d.sock, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def stream_bytes(d) -> int:
    return sum(p.stat().st_size for p in d.dir.glob("*.log"))


def run_ok(cmd, d, shell: bool = False) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, shell=shell, cwd=d.root, env=snippet_env(d), capture_output=True, text=True,
                         timeout=SNIPPET_TIMEOUT, executable="/bin/sh" if shell else None)
    assert res.returncode == 0, f"exit {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def no_daemon_errors(d) -> None:
    errors = {k: v for k, v in d.status()["errors"].items() if v}
    assert not errors, f"the snippet made the daemon count errors: {errors}\n{d.stderr()}"


class TestReadmeBlocks:
    def test_every_block_has_a_language_this_test_runs(self):
        """Each fenced block is tagged with a language this file knows how to check (an untagged block would go untested)."""
        bad = [f"line {s.line - 1}: ```{s.lang}" for s in ALL if s.lang not in KNOWN_LANGS]
        assert not bad, f"README.md blocks without a known language tag (tag them, or teach tests/test_readme.py): {bad}"

    def test_skip_list_is_current(self):
        """Every SKIPPED and DAEMON_STEPS entry is a step the README still has (the list cannot hide a removed or edited command)."""
        steps = {s.code for s in SHELL}
        stale = sorted((set(SKIPPED) | DAEMON_STEPS) - steps)
        assert not stale, f"tests/test_readme.py names steps the README no longer has: {stale}"

    def test_shell_blocks_never_call_a_bare_logsink(self):
        """Shell steps call ``.venv/bin/logsink``, which the README's own install provides (a bare ``logsink`` is not on PATH)."""
        bare = [s.code for s in SHELL if BARE_LOGSINK.search(s.code)]
        assert not bare, f"README shell steps with a bare logsink: {bare}"

    @pytest.mark.parametrize("snippet", PYTHON, ids=lambda s: s.id)
    def test_python_block_runs_and_lands_records(self, snippet, daemon, tmp_path):
        """The Python block, saved as a file and run with this interpreter, exits 0 and its records are in the daemon's files."""
        d = daemon("readwrite")
        script = tmp_path / "snippet.py"
        script.write_text(snippet.code)
        run_ok([sys.executable, str(script)], d)
        wait_for(lambda: stream_bytes(d) > 0, 15, "the snippet's records in a stream file")
        no_daemon_errors(d)

    @pytest.mark.parametrize("step", SHELL, ids=lambda s: s.id)
    def test_shell_step_runs(self, step, daemon, tmp_path):
        """The shell step exits 0 against a live daemon (a daemon command: serves, writes ./logs/<stream>.log, exits 0 on SIGTERM)."""
        if step.code in SKIPPED:
            pytest.skip(f"README line {step.line}: {SKIPPED[step.code]}")
        if step.code in DAEMON_STEPS:
            return self._daemon_step(step, tmp_path)
        d = daemon("readwrite")
        before = stream_bytes(d)
        run_ok(venv_mapped(step.code), d, shell=True)
        if "Client(" in step.code or "logsink pipe" in step.code:
            wait_for(lambda: stream_bytes(d) > before, 15, "the step's records in a stream file")
        no_daemon_errors(d)

    def _daemon_step(self, step: Snippet, tmp_path: Path) -> None:
        """Run the README's daemon command on its embedded defaults in an empty directory (socket from LOGSINK_SOCKET)."""
        from logsink import Client

        sock = tmp_path / "s.sock"
        env = {**os.environ, "LOGSINK_SOCKET": str(sock)}
        err = open(tmp_path / "stderr", "wb")
        proc = subprocess.Popen(shlex.split(venv_mapped(step.code)), cwd=tmp_path, env=env, stdout=err, stderr=err)
        try:
            def ready() -> bool:
                assert proc.poll() is None, f"exited {proc.returncode}: {(tmp_path / 'stderr').read_text()}"
                return sock.exists()
            wait_for(ready, 20, f"the daemon's socket {sock}")
            with Client("app", socket=str(sock)) as c:
                c.write(b'{"msg": "readme"}\n')
                c.flush()
            assert (tmp_path / "logs" / "app.log").read_bytes() == b'{"msg": "readme"}\n'
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(30)
            err.close()
        assert rc == 0, f"exit {rc} after SIGTERM: {(tmp_path / 'stderr').read_text()[-3000:]}"

    @pytest.mark.parametrize("snippet", TOML, ids=lambda s: s.id)
    def test_toml_block_loads_as_a_daemon_config(self, snippet, tmp_path):
        """The TOML block is a config the daemon accepts on this host (every key known, every user and group name resolves)."""
        from logsink import config

        path = tmp_path / "logsink.toml"
        path.write_text(snippet.code)
        try:
            config.load(str(path), {})
        except config.ConfigError as exc:
            pytest.fail(f"README line {snippet.line}: {exc}")

    @pytest.mark.parametrize("snippet", TEXT, ids=lambda s: s.id)
    def test_synopsis_names_only_flags_the_cli_has(self, snippet):
        """Each ``logsink SUBCOMMAND [--flag ...]`` line of the synopsis uses a subcommand and flags that ``logsink SUBCOMMAND --help`` lists."""
        lines = [ln for ln in snippet.code.splitlines() if ln.strip()]
        cmds, cur = [], None
        for ln in lines:
            if ln.startswith("logsink "):
                cur = [ln]
                cmds.append(cur)
            elif ln.startswith(" ") and cur is not None:
                cur.append(ln)  # continuation of the command above
        assert cmds, f"README line {snippet.line}: a text block with no 'logsink ...' synopsis line"
        for cmd in cmds:
            text = " ".join(cmd).split("#")[0]
            sub = text.split()[1]
            res = subprocess.run([sys.executable, "-m", "logsink", sub, "--help"], capture_output=True, text=True, timeout=60)
            assert res.returncode == 0, f"logsink {sub} --help: {res.stderr}"
            if sub == "bench":
                continue  # its flags are the harness's (benchmarks/README.md); the synopsis shows [...]
            flags = set(re.findall(r"--[\w-]+", text))
            missing = sorted(f for f in flags if f not in res.stdout)
            assert not missing, f"README synopsis of logsink {sub} names flags its --help does not: {missing}"


class TestReadmeParser:
    def test_blocks_steps_and_mapping(self):
        """The extractor finds tagged blocks with their line numbers, splits shell lines at && and maps .venv/bin/."""
        blocks = readme_blocks("x\n```sh\na && b\n# c\nd  # note\n```\n```python\nprint(1)\n```\n")
        assert [(b.lang, b.line) for b in blocks] == [("sh", 3), ("python", 8)]
        assert [s.code for s in shell_steps(blocks[0])] == ["a", "b", "d"]
        assert venv_mapped(".venv/bin/python -c 1") == f"{sys.executable} -c 1"
        with pytest.raises(AssertionError):
            readme_blocks("```sh\nnever closed\n")
        assert BARE_LOGSINK.search("logsink status") and BARE_LOGSINK.search("tail -F x | logsink pipe x")
        assert not BARE_LOGSINK.search(".venv/bin/logsink status") and not BARE_LOGSINK.search("pip install -f dist logsink")
