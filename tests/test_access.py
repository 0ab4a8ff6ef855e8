"""Who may write where: per-stream access rules (logsink/access.py), status readers, and clients that refuse an impostor daemon.

The pure checks (``admit``, ``may_read_status``) and the config parsing are tested without a
daemon. The live tests run producers, ``logsink status`` and whole daemons under uid 65534
(nobody) next to root ones, in a world-traversable temporary directory: they need root and skip
without it.
"""

from __future__ import annotations

import errno
import functools
import grp
import json
import os
import pwd
import shutil
import site
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from conftest import START_TIMEOUT
from conftest import Daemon as DaemonProc
from lsk_helpers import wait_for

from logsink import protocol
from logsink.access import AccessRules, Principals, admit, admit_tcp, may_read_status, peer_gids
from logsink.config import ConfigError, default_socket_path, load

NOBODY = 65534
DAEMON_UID = 4242  # an arbitrary daemon uid for the pure tests (not root, not NOBODY)
STATUS_TIMEOUT = 20.0
ROOT = Path(__file__).resolve().parent.parent
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: runs processes as uid 65534 (nobody) beside root ones")


@functools.cache
def unprivileged_python() -> tuple[str, dict[str, str]]:
    """An interpreter uid 65534 can run, with an environment that imports this logsink: the test's own, or
    (when it lives under a private home, e.g. pyenv in /root) the system python3 of the same version
    with this checkout and its site-packages on PYTHONPATH. Skips the test when there is none."""
    probe = "import logsink._core, msgpack, structlog"
    env = {k: v for k, v in os.environ.items() if k not in ("LOGSINK_SOCKET", "XDG_RUNTIME_DIR")}
    candidates = [(sys.executable, env)]
    system = shutil.which(f"python{sys.version_info.major}.{sys.version_info.minor}", path="/usr/bin:/usr/local/bin")
    if system:
        path = os.pathsep.join([str(ROOT), *site.getsitepackages()])
        candidates.append((system, {**env, "PYTHONPATH": path}))
    for exe, e in candidates:
        try:
            res = subprocess.run([exe, "-c", probe], env=e, user=NOBODY, group=NOBODY, extra_groups=[], cwd="/",
                                 capture_output=True, timeout=60)
        except OSError:
            continue
        if res.returncode == 0:
            return exe, e
    pytest.skip(f"no python{sys.version_info.major}.{sys.version_info.minor} that uid {NOBODY} can run and import logsink with")


def as_nobody(gid: int = NOBODY, groups: list[int] | None = None, uid: int = NOBODY) -> dict:
    """subprocess arguments that run the interpreter from unprivileged_python() as uid 65534 (or ``uid``)."""
    return {"user": uid, "group": gid, "extra_groups": groups or [], "env": unprivileged_python()[1]}


def rules(**kw) -> AccessRules:
    """Access rules as the config would make them, with a fixed daemon uid."""
    return AccessRules(daemon_uid=DAEMON_UID, write_rules=True, **kw)


def P(uids=(), gids=()) -> Principals:
    return Principals(frozenset(uids), frozenset(gids))


# -- the pure checks ------------------------------------------------------------------------------
class TestAdmit:
    def test_no_write_rules_admit_every_uid_on_every_stream(self):
        """Without write rules (today's behaviour) any local uid may write any stream."""
        r = AccessRules(daemon_uid=DAEMON_UID)
        assert admit(r, "audit", 1000, frozenset({1000})) is None
        assert admit(r, "x", NOBODY, frozenset()) is None

    def test_stream_table_admits_listed_uid_and_refuses_others(self):
        """[stream.audit] allow_uids admits exactly those uids for that stream."""
        r = rules(streams={"audit": P(uids={1000})})
        assert admit(r, "audit", 1000, frozenset({1000})) is None
        assert admit(r, "audit", 1001, frozenset({1001})) is not None

    def test_stream_table_admits_by_any_of_the_peers_groups(self):
        """allow_gids matches the primary gid or any supplementary group of the peer."""
        r = rules(streams={"audit": P(gids={50})})
        assert admit(r, "audit", 1000, frozenset({1000, 50})) is None
        assert admit(r, "audit", 1000, frozenset({1000, 51})) is not None

    def test_default_table_covers_only_streams_without_their_own(self):
        """[streams_default] applies to streams with no [stream.NAME]; a stream's own table replaces it."""
        r = rules(default=P(uids={1000}), streams={"audit": P(uids={1001})})
        assert admit(r, "app", 1000, frozenset()) is None
        assert admit(r, "audit", 1000, frozenset()) is not None
        assert admit(r, "audit", 1001, frozenset()) is None
        assert admit(r, "app", 1001, frozenset()) is not None

    def test_uid_patterns_grant_matching_streams_only(self):
        """[access.uid] patterns (fnmatch) admit the uid for the streams they match, and no other."""
        r = rules(uid_streams={33: ("web.*", "nginx")})
        assert admit(r, "web.access", 33, frozenset({33})) is None
        assert admit(r, "nginx", 33, frozenset({33})) is None
        assert admit(r, "webx", 33, frozenset({33})) is not None
        assert admit(r, "web.access", 34, frozenset({34})) is not None

    def test_gid_patterns_grant_to_every_member(self):
        """[access.gid] patterns admit any peer with that group among its groups."""
        r = rules(gid_streams={4: ("*",)})
        assert admit(r, "anything", 1000, frozenset({1000, 4})) is None
        assert admit(r, "anything", 1000, frozenset({1000})) is not None

    def test_grants_add_to_a_stream_table(self):
        """A pattern grant admits even where the stream's own table does not list the peer (rules only grant)."""
        r = rules(streams={"audit": P(uids={1001})}, gid_streams={4: ("audit",)})
        assert admit(r, "audit", 1000, frozenset({4})) is None

    def test_root_and_daemon_uid_are_admitted_unless_trust_root_is_off(self):
        """uid 0 and the daemon's own uid pass every write rule unless trust_root = false."""
        r = rules(default=P())
        assert admit(r, "audit", 0, frozenset({0})) is None
        assert admit(r, "audit", DAEMON_UID, frozenset()) is None
        strict = rules(default=P(), trust_root=False)
        assert admit(strict, "audit", 0, frozenset({0})) is not None
        assert admit(strict, "audit", DAEMON_UID, frozenset()) is not None

    def test_empty_default_table_leaves_only_root_and_the_daemon(self):
        """An empty [streams_default] turns rules on: nobody else may write any stream."""
        r = rules(default=P())
        assert admit(r, "app", 1000, frozenset({1000})) is not None

    def test_refusal_reason_names_uid_stream_groups_and_the_fix(self):
        """The refusal says which uid, which stream and groups, and which config keys would admit it."""
        reason = admit(rules(streams={"audit": P(uids={1})}), "audit", 1000, frozenset({1000, 27}))
        assert "uid 1000" in reason and "'audit'" in reason and "27" in reason
        assert "[stream.audit]" in reason and "[access.uid]" in reason


class TestAdmitTcp:
    def test_tcp_producers_may_write_every_stream_without_tcp_streams(self):
        """Without tcp_streams a TCP producer (no uid; the token governs it) may write any stream."""
        assert admit_tcp(rules(default=P()), "app") is None

    def test_tcp_streams_patterns_limit_tcp_producers(self):
        """tcp_streams limits TCP producers to the matching streams, and says so when refusing."""
        r = rules(tcp_streams=("web.*",))
        assert admit_tcp(r, "web.1") is None
        reason = admit_tcp(r, "audit")
        assert reason is not None and "tcp_streams" in reason and "'audit'" in reason


class TestStatusAccess:
    def test_root_and_daemon_uid_may_read_status(self):
        """By default root and the daemon's own uid may read status."""
        r = AccessRules(daemon_uid=DAEMON_UID)
        assert may_read_status(r, 0, frozenset({0})) is None
        assert may_read_status(r, DAEMON_UID, frozenset()) is None

    def test_other_uids_are_refused_status_by_default(self):
        """Any other uid is refused status, with a reason naming the config keys."""
        reason = may_read_status(AccessRules(daemon_uid=DAEMON_UID), NOBODY, frozenset({NOBODY}))
        assert reason is not None and f"uid {NOBODY}" in reason and "status_uids" in reason

    def test_status_uids_and_gids_admit_readers(self):
        """status_uids and status_gids add readers."""
        r = AccessRules(daemon_uid=DAEMON_UID, status=P(uids={1000}, gids={4}))
        assert may_read_status(r, 1000, frozenset()) is None
        assert may_read_status(r, 1001, frozenset({4})) is None
        assert may_read_status(r, 1001, frozenset({5})) is not None

    def test_status_is_not_served_over_tcp(self):
        """A TCP peer (no uid) is refused status."""
        assert may_read_status(AccessRules(daemon_uid=DAEMON_UID), None, frozenset()) is not None


class TestPeerGids:
    def test_primary_and_supplementary_groups_of_a_known_uid(self):
        """peer_gids returns the SO_PEERCRED gid plus the uid's groups from the group database."""
        name = pwd.getpwuid(0).pw_name
        assert peer_gids(0, 12345) == frozenset(os.getgrouplist(name, 12345)) | {12345}

    def test_uid_without_passwd_entry_has_only_its_gid(self):
        """A uid the passwd database does not know keeps just its primary gid."""
        uid = next(u for u in range(54321, 60000) if not _has_pw(u))
        assert peer_gids(uid, 777) == frozenset({777})


def _pw(name: str):
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def _has_pw(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


# -- the config -----------------------------------------------------------------------------------
def write_config(path: Path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    return str(path)


class TestAccessConfig:
    def test_names_and_numbers_resolve_at_load(self, tmp_path):
        """User and group names resolve with pwd/grp; numbers (and digit strings) are taken as they are."""
        root_group = grp.getgrgid(0).gr_name
        cfg = load(write_config(tmp_path / "c.toml", f"""
            [access]
            status_uids = ["nobody", 1234]
            status_gids = ["{root_group}"]
            tcp_streams = ["web.*"]
            [access.uid]
            nobody = ["web.*"]
            "1001" = ["batch"]
            [access.gid]
            {root_group} = ["*"]
            [streams_default]
            allow_uids = [1000]
            [stream.audit]
            allow_uids = ["root"]
            allow_gids = [{NOBODY}]
        """), {})
        r = cfg.access_rules
        assert r.write_rules and r.trust_root
        assert r.status == P(uids={NOBODY, 1234}, gids={0})
        assert r.uid_streams == {NOBODY: ("web.*",), 1001: ("batch",)}
        assert r.gid_streams == {0: ("*",)}
        assert r.default == P(uids={1000})
        assert r.streams == {"audit": P(uids={0}, gids={NOBODY})}
        assert r.tcp_streams == ("web.*",)
        assert r.daemon_uid == os.geteuid()

    def test_no_access_config_means_no_write_rules(self, tmp_path):
        """A config without [access]/[stream]/[streams_default] keeps every stream open to every uid."""
        r = load(write_config(tmp_path / "c.toml", 'dir = "x"\n'), {}).access_rules
        assert not r.write_rules
        assert admit(r, "app", 1000, frozenset()) is None

    def test_status_readers_alone_do_not_turn_write_rules_on(self, tmp_path):
        """[access] status_uids configures status only; writes stay open."""
        r = load(write_config(tmp_path / "c.toml", '[access]\nstatus_uids = [1000]\n'), {}).access_rules
        assert not r.write_rules

    def test_unknown_user_name_is_a_config_error_naming_it(self, tmp_path):
        """An allow_uids name the passwd database does not know fails the load, naming it and where it is."""
        path = write_config(tmp_path / "c.toml", '[stream.audit]\nallow_uids = ["no-such-user-xyz"]\n')
        with pytest.raises(ConfigError, match=r"no-such-user-xyz.*") as exc:
            load(path, {})
        assert "stream.audit.allow_uids" in str(exc.value)

    def test_unknown_group_name_is_a_config_error_naming_it(self, tmp_path):
        """An unknown group in [access.gid] fails the load, naming it."""
        path = write_config(tmp_path / "c.toml", '[access.gid]\nno-such-group-xyz = ["*"]\n')
        with pytest.raises(ConfigError, match="no-such-group-xyz"):
            load(path, {})

    def test_unknown_key_in_a_stream_table_is_a_config_error(self, tmp_path):
        """A misspelt key in [stream.NAME] is refused with the keys that exist."""
        path = write_config(tmp_path / "c.toml", '[stream.audit]\nallow_users = ["root"]\n')
        with pytest.raises(ConfigError, match="allow_users.*allow_gids.*allow_uids"):
            load(path, {})

    def test_invalid_stream_name_in_a_table_is_a_config_error(self, tmp_path):
        """[stream."../x"] names no possible stream and is refused."""
        path = write_config(tmp_path / "c.toml", '[stream."../x"]\nallow_uids = [0]\n')
        with pytest.raises(ConfigError, match="invalid"):
            load(path, {})

    def test_patterns_must_be_a_list_of_strings(self, tmp_path):
        """[access.uid] values must be lists of stream patterns."""
        path = write_config(tmp_path / "c.toml", '[access.uid]\nroot = "web.*"\n')
        with pytest.raises(ConfigError, match=r"access\.uid\.root.*list"):
            load(path, {})

    def test_negative_uid_is_a_config_error(self, tmp_path):
        """A negative number is no uid."""
        path = write_config(tmp_path / "c.toml", '[streams_default]\nallow_uids = [-1]\n')
        with pytest.raises(ConfigError, match="-1"):
            load(path, {})


# -- the default socket path ----------------------------------------------------------------------
class TestDefaultSocketPath:
    def _clear(self, monkeypatch):
        for k in ("LOGSINK_SOCKET", "XDG_RUNTIME_DIR"):
            monkeypatch.delenv(k, raising=False)

    @needs_root
    def test_root_without_xdg_runtime_dir_uses_run_logsink(self, monkeypatch):
        """Root with no $LOGSINK_SOCKET/$XDG_RUNTIME_DIR meets the daemon in /run/logsink, not in /tmp."""
        from logsink._native import ffi, lib

        self._clear(monkeypatch)
        assert default_socket_path() == "/run/logsink/logsink.sock"
        buf = ffi.new("char[]", 256)
        assert lib.ls_default_socket_path(buf, 256) > 0
        assert ffi.string(buf).decode() == "/run/logsink/logsink.sock"

    @needs_root
    def test_unprivileged_user_resolves_like_the_c_twin(self):
        """For uid 65534 with no env, Python and C agree: /run/logsink if that directory is usable, else /tmp/logsink-65534.sock."""
        code = ("import os; from logsink.config import default_socket_path; from logsink._native import ffi, lib; "
                "b = ffi.new('char[]', 256); lib.ls_default_socket_path(b, 256); "
                "print(default_socket_path()); print(ffi.string(b).decode())")
        res = subprocess.run([unprivileged_python()[0], "-c", code], capture_output=True, text=True, timeout=60, cwd="/", **as_nobody())
        assert res.returncode == 0, res.stderr
        py, c = res.stdout.split()
        usable = os.path.isdir("/run/logsink") and _nobody_can_search("/run/logsink")
        assert py == c == ("/run/logsink/logsink.sock" if usable else f"/tmp/logsink-{NOBODY}.sock")


def _nobody_can_search(path: str) -> bool:
    res = subprocess.run(["test", "-x", path], user=NOBODY, group=NOBODY, extra_groups=[])
    return res.returncode == 0


# -- live daemons ---------------------------------------------------------------------------------
@pytest.fixture
def shared_dir():
    """A temporary directory that uid 65534 can reach (pytest's tmp_path is private to root)."""
    d = Path(tempfile.mkdtemp(prefix="lsk-acl-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


class NobodyDaemon(DaemonProc):
    """``logsink serve`` run as uid/gid 65534: the impostor squatting a socket path."""

    def start(self) -> NobodyDaemon:
        os.chown(self.root, NOBODY, NOBODY)
        os.chown(self.dir, NOBODY, NOBODY)
        exe, _ = unprivileged_python()
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen([exe, *self.cmd[1:]], stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=self._stderr,
                                     cwd=self.root, **as_nobody())
        wait_for(self._ready, START_TIMEOUT, f"the daemon to accept connections on {self.sock}")
        return self


@pytest.fixture
def acl_daemon(shared_dir):
    """Factory: ``acl_daemon(config_text, as_nobody=False)`` starts a daemon whose socket uid 65534 can
    connect to; teardown stops it and requires exit 0."""
    started: list[DaemonProc] = []

    def start(config: str = "", as_nobody: bool = False, engine: str = "readwrite") -> DaemonProc:
        root = shared_dir / f"d{len(started)}"
        root.mkdir()
        extra: tuple[str, ...] = ()
        if config:
            extra = ("--config", write_config(shared_dir / f"c{len(started)}.toml", config))
        d = (NobodyDaemon if as_nobody else DaemonProc)(root, engine, extra)
        started.append(d)
        d.start()
        os.chmod(d.sock, 0o666)  # who may connect at all is the socket mode's job (another setting); here: everyone
        return d

    yield start
    errors = []
    for d in started:
        try:
            d.close()
        except BaseException as exc:
            errors.append(str(exc))
    if errors:
        pytest.fail("\n\n".join(errors))


PRODUCE = """
import json, sys
from logsink import Client
sock, stream, opts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
try:
    with Client(stream, socket=sock, timeout=15, **opts) as c:
        c.write(b"line from uid %d\\n" % __import__("os").getuid())
        c.flush(15)
    print(json.dumps({"ok": True}))
except Exception as exc:
    print(json.dumps({"ok": False, "type": type(exc).__name__, "error": str(exc)}))
"""


def produce(sock: str, stream: str, uid: int = 0, gid: int | None = None, groups: list[int] | None = None, **opts) -> dict:
    """Run a logsink.Client as ``uid`` in a subprocess: write one line to ``stream`` and flush; its outcome."""
    exe, as_user = (sys.executable, {}) if uid == 0 else (unprivileged_python()[0], as_nobody(uid if gid is None else gid, groups, uid))
    res = subprocess.run([exe, "-c", PRODUCE, sock, stream, json.dumps(opts)], capture_output=True, text=True,
                         timeout=60, cwd="/", **as_user)
    assert res.returncode == 0 and res.stdout.strip(), res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def cli_status(sock: str, uid: int = 0, *args: str) -> subprocess.CompletedProcess:
    assert uid in (0, NOBODY)
    exe, as_user = (sys.executable, {}) if uid == 0 else (unprivileged_python()[0], as_nobody())
    return subprocess.run([exe, "-m", "logsink", "status", "--socket", sock, "--json", *args], capture_output=True,
                          text=True, timeout=60, cwd="/", **as_user)


@needs_root
class TestHelloAdmission:
    def test_refused_hello_gets_forbidden_a_counter_and_a_log_line(self, acl_daemon):
        """A uid no rule admits gets ERROR forbidden (PermissionError in Python), errors['forbidden'] counts it, and the daemon logs pid/uid/stream."""
        d = acl_daemon("[stream.audit]\nallow_uids = [\"root\"]\n")
        out = produce(d.sock, "audit", uid=NOBODY)
        assert out["ok"] is False and out["type"] == "PermissionError", out
        assert "forbidden" in out["error"] and f"uid {NOBODY}" in out["error"] and "'audit'" in out["error"]
        assert d.status()["errors"][protocol.E_FORBIDDEN] == 1
        events = [e for e in d.stderr_events() if e.get("code") == protocol.E_FORBIDDEN]
        assert len(events) == 1 and events[0]["uid"] == NOBODY and events[0]["stream"] == "audit" and events[0]["pid"] > 0
        assert not d.log("audit").exists() or d.log("audit").read_bytes() == b""

    def test_listed_uid_and_root_write_the_stream(self, acl_daemon):
        """The uid a rule lists, and root, land their lines; the refused one does not."""
        d = acl_daemon(f"[stream.audit]\nallow_uids = [{NOBODY}]\n[streams_default]\nallow_uids = []\n")
        assert produce(d.sock, "audit", uid=NOBODY) == {"ok": True}
        assert produce(d.sock, "audit", uid=0) == {"ok": True}
        assert produce(d.sock, "app", uid=NOBODY)["type"] == "PermissionError"
        assert d.log("audit").read_bytes() == f"line from uid {NOBODY}\nline from uid 0\n".encode()

    def test_supplementary_group_of_the_uid_admits(self, acl_daemon):
        """A group the uid belongs to in the group database (not its primary gid) admits it via allow_gids."""
        member = next(((pw, g) for g in grp.getgrall() for name in g.gr_mem
                       if (pw := _pw(name)) and pw.pw_uid != 0 and pw.pw_gid != g.gr_gid), None)
        if member is None:
            pytest.skip("no group in the group database lists a non-root user as a supplementary member")
        pw, g = member
        d = acl_daemon(f"[streams_default]\nallow_gids = [{g.gr_gid}]\n")
        # The producer runs with its primary gid only: the daemon finds the membership in the group database.
        assert produce(d.sock, "app", uid=pw.pw_uid, gid=pw.pw_gid) == {"ok": True}
        assert produce(d.sock, "app", uid=NOBODY)["type"] == "PermissionError"

    def test_primary_gid_from_peercred_admits(self, acl_daemon):
        """The gid the process runs with (SO_PEERCRED) admits it via allow_gids."""
        d = acl_daemon("[streams_default]\nallow_gids = [4321]\n")
        assert produce(d.sock, "app", uid=NOBODY, gid=4321) == {"ok": True}
        assert produce(d.sock, "app", uid=NOBODY)["type"] == "PermissionError"

    def test_uid_pattern_grant(self, acl_daemon):
        """[access.uid] nobody = ["web.*"] admits web.access and refuses app."""
        d = acl_daemon('[access.uid]\nnobody = ["web.*"]\n')
        assert produce(d.sock, "web.access", uid=NOBODY) == {"ok": True}
        assert produce(d.sock, "app", uid=NOBODY)["type"] == "PermissionError"

    def test_no_rules_keep_every_uid_writing(self, acl_daemon):
        """Without access config any uid that reaches the socket writes any stream (the documented default)."""
        d = acl_daemon()
        assert produce(d.sock, "app", uid=NOBODY) == {"ok": True}


@needs_root
class TestStatusReaders:
    def test_status_from_uid_65534_is_refused_by_default(self, acl_daemon):
        """`logsink status` as uid 65534 gets `forbidden`, exits 1 and says who may read it; the refusal is counted."""
        d = acl_daemon()
        res = cli_status(d.sock, NOBODY)
        assert res.returncode == 1
        assert "forbidden" in res.stderr and f"uid {NOBODY}" in res.stderr and "status_uids" in res.stderr
        assert d.status()["errors"][protocol.E_FORBIDDEN] == 1

    def test_status_from_uid_65534_is_allowed_when_configured(self, acl_daemon):
        """status_uids = ["nobody"] lets uid 65534 read status."""
        d = acl_daemon('[access]\nstatus_uids = ["nobody"]\n')
        res = cli_status(d.sock, NOBODY)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["socket"] == d.sock

    def test_status_gids_admit_a_group(self, acl_daemon):
        """status_gids admits a reader by group."""
        d = acl_daemon(f"[access]\nstatus_gids = [{NOBODY}]\n")
        assert cli_status(d.sock, NOBODY).returncode == 0


@needs_root
class TestClientRefusesImpostor:
    def test_python_client_refuses_a_daemon_of_another_uid(self, acl_daemon):
        """A root Client pointed at a daemon run by uid 65534 refuses before HELLO, saying which uid and how to accept it."""
        d = acl_daemon(as_nobody=True)
        out = produce(d.sock, "app")
        assert out["ok"] is False and out["type"] == "PermissionError", out
        assert f"runs as uid {NOBODY}, not uid 0 or root" in out["error"] and f"expected_uid={NOBODY}" in out["error"]
        assert d.sock in out["error"]
        assert not d.log("app").exists()  # nothing reached the impostor
        assert not [e for e in d.stderr_events() if e.get("event") == "producer_joined"]

    def test_python_client_with_expected_uid_writes(self, acl_daemon):
        """expected_uid=65534 accepts that daemon and the record lands."""
        d = acl_daemon(as_nobody=True)
        assert produce(d.sock, "app", expected_uid=NOBODY) == {"ok": True}
        assert d.log("app").read_bytes() == b"line from uid 0\n"

    def test_expected_uid_refuses_a_daemon_of_any_other_uid(self, acl_daemon):
        """expected_uid=4242 refuses a daemon that runs as uid 65534 (neither 4242 nor root)."""
        d = acl_daemon(as_nobody=True)
        out = produce(d.sock, "app", expected_uid=4242)
        assert out["type"] == "PermissionError" and "not uid 4242 or root" in out["error"]

    def test_root_daemon_is_accepted_by_an_unprivileged_client(self, acl_daemon):
        """A uid-65534 client accepts a daemon run by root (the default peer rule: same uid or root)."""
        d = acl_daemon()
        assert produce(d.sock, "app", uid=NOBODY) == {"ok": True}

    def test_logging_handler_and_async_client_pass_expected_uid_through(self, acl_daemon):
        """LogsinkHandler and AsyncClient take expected_uid like Client (refuse without, work with)."""
        d = acl_daemon(as_nobody=True)
        code = textwrap.dedent(f"""
            import asyncio, logging
            from logsink.logging import LogsinkHandler
            from logsink.aio import AsyncClient
            try:
                LogsinkHandler("app", socket={d.sock!r})
                raise SystemExit("handler accepted the impostor")
            except PermissionError:
                pass
            h = LogsinkHandler("app", socket={d.sock!r}, expected_uid={NOBODY})
            h.emit(logging.LogRecord("t", logging.INFO, "f", 1, "via handler", None, None))
            h.close()
            async def main():
                try:
                    await AsyncClient.open("app", socket={d.sock!r})
                    raise SystemExit("AsyncClient accepted the impostor")
                except PermissionError:
                    pass
                async with AsyncClient("app", socket={d.sock!r}, expected_uid={NOBODY}) as c:
                    await c.write(b"via async\\n")
                    await c.flush()
            asyncio.run(main())
        """)
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
        assert res.returncode == 0, res.stdout + res.stderr
        text = d.log("app").read_text()
        assert "via handler" in text and "via async\n" in text

    def test_status_cli_refuses_the_impostor_unless_expected_uid(self, acl_daemon):
        """`logsink status` refuses a daemon of another uid with the same clear error; --expected-uid accepts it."""
        d = acl_daemon(as_nobody=True)
        res = cli_status(d.sock)
        assert res.returncode == 1 and f"runs as uid {NOBODY}, not uid 0 or root" in res.stderr and f"--expected-uid {NOBODY}" in res.stderr
        ok = cli_status(d.sock, 0, "--expected-uid", str(NOBODY))
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["socket"] == d.sock

    def test_c_library_refuses_the_impostor_unless_expected_uid(self, acl_daemon, c_build, shared_dir):
        """liblogsink (clients/c) refuses the impostor with -EPERM and the same message; opts.expected_uid accepts it."""
        build, _ = c_build
        exe = shared_dir / "expect"
        src = shared_dir / "expect.c"
        src.write_text(C_EXPECT)
        cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
        res = subprocess.run([cc, "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'clients' / 'c' / 'include'}", str(src),
                              str(build / "liblogsink.a"), "-lpthread", "-o", str(exe)], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        d = acl_daemon(as_nobody=True)
        bad = subprocess.run([str(exe), d.sock, "-1"], capture_output=True, text=True, timeout=60)
        assert bad.returncode == errno.EPERM, bad.stdout + bad.stderr
        assert f"runs as uid {NOBODY}, not uid 0 or root" in bad.stderr and "expected_uid" in bad.stderr
        good = subprocess.run([str(exe), d.sock, str(NOBODY)], capture_output=True, text=True, timeout=60)
        assert good.returncode == 0, good.stderr
        assert d.log("app").read_bytes() == b"from C\n"


# A liblogsink program: expect SOCKET EXPECTED_UID; exits with the errno of a failed open.
C_EXPECT = r"""
#include <logsink.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
int main(int argc, char **argv)
{
    struct logsink_opts o;
    struct logsink *ls;
    if (argc != 3)
        return 100;
    logsink_opts_init(&o);
    o.expected_uid = strtoll(argv[2], NULL, 10);
    int r = logsink_open("app", argv[1], &o, &ls);
    if (r < 0) {
        fprintf(stderr, "%s\n", logsink_last_error(NULL));
        return -r;
    }
    if ((r = logsink_write(ls, "from C\n", 7)) < 0 || (r = logsink_close(ls)) < 0)
        return 101;
    return 0;
}
"""


@pytest.fixture(scope="session")
def c_build(tmp_path_factory):
    """``make -C clients/c`` into a private build directory (as tests/test_c_client.py does); returns (dir, output)."""
    if not shutil.which("make") or not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")):
        pytest.fail("the C client test needs make and a C compiler (gcc/cc) on PATH")
    build = tmp_path_factory.mktemp("cbuild-acl") / "build"
    res = subprocess.run(["make", "-C", str(ROOT / "clients" / "c"), f"BUILD={build}"], capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, f"make -C clients/c failed:\n{res.stdout}{res.stderr}"
    return build, res.stdout


class TestTcpProducers:
    def _tcp_daemon(self, daemon, tmp_path, config: str):
        d = daemon("readwrite", "--listen", "tcp://127.0.0.1:0", "--config", write_config(tmp_path / "tcp.toml", config))
        (address,) = d.status()["listen"]  # port 0: the daemon picked it (no port bound, closed and reused)
        return d, int(address.rsplit(":", 1)[1])

    def test_tcp_streams_limit_what_tcp_producers_write(self, daemon, tmp_path):
        """With tcp_streams = ["web.*"] a TCP Client writes web.1 and gets PermissionError (forbidden) on app."""
        from logsink import Client

        d, port = self._tcp_daemon(daemon, tmp_path, '[access]\ntcp_streams = ["web.*"]\n')
        with Client("web.1", address=f"tcp://127.0.0.1:{port}", transport="copy", timeout=15) as c:
            c.write(b"over tcp\n")
            c.flush(15)
        assert d.log("web.1").read_bytes() == b"over tcp\n"
        with pytest.raises(PermissionError, match="forbidden.*tcp_streams"):
            Client("app", address=f"tcp://127.0.0.1:{port}", transport="copy", timeout=15)
        assert d.status()["errors"][protocol.E_FORBIDDEN] == 1

    def test_status_is_refused_over_tcp(self, daemon, tmp_path):
        """A STATUS request on the TCP port gets ERROR forbidden: status is for local peers the rules admit."""
        d, port = self._tcp_daemon(daemon, tmp_path, "")
        with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
            s.sendall(protocol.encode({"t": protocol.STATUS}))
            dec = protocol.ControlDecoder()
            msgs: list = []
            while not msgs:
                data = s.recv(65536)
                assert data, "the daemon closed the connection without answering"
                msgs = dec.feed(data)
        assert msgs[0]["t"] == protocol.ERROR and msgs[0]["code"] == protocol.E_FORBIDDEN, msgs
        assert d.status()["errors"][protocol.E_FORBIDDEN] == 1


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
