"""The agent keeps only the capabilities it uses (control/privileges.py, README "Privileges").

The pure parts are checked alone; the drop itself in a child Python process (the
test runner keeps its own privileges); the agent as a real process in a lab host,
as root and as ``nobody``, with each relay: a connection by name through the proxy,
DNS on port 53, a UDP route programmed and used at run time, its rules removed on
SIGTERM. Children that must not start an agent in the root namespace by mistake
run in a network namespace of their own (``unshare --net``).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Peers
from test_udp_mesh import ECHO_SERVER, FlowClient

from consulate.control import lab as labmod
from consulate.control import privileges
from consulate.control.config import AgentConfig
from consulate.control.labagent import LabAgent
from consulate.control.privileges import (
    CAP_BPF,
    CAP_NET_ADMIN,
    CAP_NET_BIND_SERVICE,
    CAP_NET_RAW,
    CAP_SYS_ADMIN,
    CAP_SYS_RESOURCE,
    PrivilegeError,
    ProcessPrivileges,
)

NOBODY = 65534
BASE = frozenset({CAP_NET_ADMIN, CAP_NET_BIND_SERVICE})
MiB = 1024 * 1024

# /proc/<pid>/status of a process after the drop to nobody, as kernel 6.x prints it.
STATUS_SAMPLE = """Name:\tpython3
Umask:\t0022
State:\tS (sleeping)
Tgid:\t4242
Uid:\t65534\t65534\t65534\t65534
Gid:\t65534\t65534\t65534\t65534
FDSize:\t64
Groups:\t65534 109
NoNewPrivs:\t1
Seccomp:\t0
CapInh:\t0000000000001400
CapPrm:\t0000000000001400
CapEff:\t0000000000001400
CapBnd:\t0000000000001400
CapAmb:\t0000000000001400
"""


def _own() -> ProcessPrivileges:
    return privileges.parse_status(Path("/proc/self/status").read_text())


# -- the pure part -----------------------------------------------------------------------

def test_needed_capabilities_are_net_admin_and_bind_plus_what_options_use() -> None:
    assert privileges.needed_capabilities(native_relay=False, exec_netns=False) == BASE
    assert privileges.needed_capabilities(native_relay=True, exec_netns=False) == (
        BASE | {CAP_SYS_RESOURCE})
    assert privileges.needed_capabilities(native_relay=False, exec_netns=True) == (
        BASE | {CAP_SYS_ADMIN})
    assert privileges.needed_capabilities(native_relay=False, exec_netns=False,
                                          legacy_iptables=True) == BASE | {CAP_NET_RAW}
    assert privileges.needed_capabilities(native_relay=False, exec_netns=False,
                                          sk_lookup=True) == BASE | {CAP_BPF}


def test_legacy_iptables_is_told_by_its_version_line() -> None:
    assert privileges.is_legacy_iptables("iptables-restore v1.8.9 (legacy)\n")
    assert not privileges.is_legacy_iptables("iptables-restore v1.8.9 (nf_tables)\n")
    assert not privileges.is_legacy_iptables("")


def test_agent_needs_follows_its_options() -> None:
    redirect = {"tcp_intercept": "redirect"}
    assert privileges.agent_needs(AgentConfig(relay="python", **redirect)) == BASE
    assert privileges.agent_needs(AgentConfig(relay="native", **redirect)) == (
        BASE | {CAP_SYS_RESOURCE})
    # the exec netns is only used by the scheduler
    assert privileges.agent_needs(AgentConfig(relay="python", **redirect,
                                              scheduler_exec_netns="lab-h1c1")) == BASE
    assert privileges.agent_needs(AgentConfig(relay="python", scheduler=True, **redirect,
                                              scheduler_exec_netns="lab-h1c1")) == (
        BASE | {CAP_SYS_ADMIN})
    # BPF sk_lookup (the default, auto, may use it) loads a program at start
    for intercept in ("auto", "sk-lookup"):
        assert privileges.agent_needs(AgentConfig(relay="python", tcp_intercept=intercept)) \
            == BASE | {CAP_BPF}
    # no VIP route and rules, nothing to steer
    assert privileges.agent_needs(AgentConfig(relay="python", iptables=False)) == BASE


def test_masks_and_names() -> None:
    assert privileges.mask_of(BASE) == 0x1400
    assert privileges.names_of(0x1400) == ["CAP_NET_BIND_SERVICE", "CAP_NET_ADMIN"]
    assert privileges.names_of(1 << 41 | 1) == ["CAP_CHOWN", "CAP_41"]
    assert privileges.names_of(0) == []
    assert len(privileges.CAPABILITIES) == 41  # CAP_CHECKPOINT_RESTORE (40) is the last


def test_parse_status_reads_ids_sets_and_no_new_privs() -> None:
    assert privileges.parse_status(STATUS_SAMPLE) == ProcessPrivileges(
        uid=NOBODY, gid=NOBODY, groups=(NOBODY, 109), inheritable=0x1400,
        permitted=0x1400, effective=0x1400, bounding=0x1400, ambient=0x1400,
        no_new_privs=True)
    no_groups = STATUS_SAMPLE.replace("Groups:\t65534 109", "Groups:\t")
    assert privileges.parse_status(no_groups).groups == ()
    with pytest.raises(ValueError, match=r"^/proc status has no CapAmb line$"):
        privileges.parse_status(STATUS_SAMPLE.replace("CapAmb", "Other"))


def test_is_dropped_needs_no_extra_capability_the_uid_and_no_new_privs() -> None:
    done = privileges.parse_status(STATUS_SAMPLE)
    assert privileges.is_dropped(done, BASE, NOBODY)
    assert privileges.is_dropped(done, BASE, None)
    assert not privileges.is_dropped(done, BASE, 0)
    assert not privileges.is_dropped(done, frozenset({CAP_NET_ADMIN}), NOBODY)
    with_more = STATUS_SAMPLE.replace("CapPrm:\t0000000000001400", "CapPrm:\t0000000000201400")
    assert not privileges.is_dropped(privileges.parse_status(with_more), BASE, NOBODY)
    without_nnp = STATUS_SAMPLE.replace("NoNewPrivs:\t1", "NoNewPrivs:\t0")
    assert not privileges.is_dropped(privileges.parse_status(without_nnp), BASE, NOBODY)


def test_accounts_resolve_and_unknown_names_say_what_to_do() -> None:
    account = privileges.resolve_account("nobody")
    assert (account.user, account.uid, account.gid) == ("nobody", NOBODY, 65534)
    assert account.groups == (65534,)
    assert privileges.resolve_account("nobody", "root").gid == 0
    with pytest.raises(PrivilegeError) as unknown:
        privileges.resolve_account("no-such-user-xq")
    assert str(unknown.value) == ("--user 'no-such-user-xq': no such user on this host "
                                  "(create it, for example `useradd --system no-such-user-xq`)")
    with pytest.raises(PrivilegeError) as unknown_group:
        privileges.resolve_account("nobody", "no-such-group-xq")
    assert str(unknown_group.value) == "--group 'no-such-group-xq': no such group on this host"


# -- running code as another user on this machine ----------------------------------------

def reachable_python(aside: Path) -> list[str]:
    """A launcher under which ``nobody`` can run this interpreter: where it lives below a
    directory others may not enter (pyenv in /root), a private mount namespace shows
    that directory as a tmpfs holding only the interpreter's tree. Nothing changes
    outside that namespace, which ends with the process."""
    for ancestor in Path(sys.base_prefix).resolve().parents:
        if ancestor != Path("/") and not ancestor.stat().st_mode & stat.S_IXOTH:
            inside = Path(sys.base_prefix).resolve().relative_to(ancestor).parts[0]
            script = ('mount --bind "$1/$2" "$3" && mount -t tmpfs -o mode=0755 tmpfs "$1" '
                      '&& mkdir "$1/$2" && mount --move "$3" "$1/$2" && shift 3 && '
                      'exec "$@"')
            return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                    "sh", str(ancestor), inside, str(aside)]
    return []


@pytest.fixture
def launcher() -> Iterator[list[str]]:
    aside = Path(tempfile.mkdtemp(prefix="consulate-aside-"))
    try:
        yield reachable_python(aside)
    finally:
        aside.rmdir()


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory any user can reach (pytest's own are root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="consulate-priv-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


# -- the drop, in a child process ----------------------------------------------------------

DROP_CHILD = """
import json, logging, os, subprocess, sys
from consulate.control import privileges
logging.basicConfig(level="INFO", format="%(message)s")
account = privileges.resolve_account(sys.argv[1]) if sys.argv[1] else None
privileges.drop(frozenset({privileges.CAP_NET_ADMIN, privileges.CAP_NET_BIND_SERVICE}),
                account)
try:
    os.chown(sys.argv[2], 1234, 1234)  # CAP_CHOWN: dropped
    chown = "allowed"
except PermissionError:
    chown = "refused"
child = subprocess.run(["grep", "-E", "^(Uid|Gid|Groups|Cap|NoNewPrivs)", "/proc/self/status"],
                       capture_output=True, text=True, check=True).stdout
link = subprocess.run(["ip", "link", "set", "lo", "up"], capture_output=True, text=True)
print(json.dumps({"status": open("/proc/self/status").read(), "child": child,
                  "chown": chown, "ip_link": link.returncode}))
"""


def _drop_in_child(user: str, prefix: list[str], victim: Path) -> dict[str, object]:
    done = subprocess.run(["unshare", "--net", *prefix, sys.executable, "-c", DROP_CHILD,
                           user, str(victim)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    result["stderr"] = done.stderr
    return result


@pytest.mark.parametrize("user", ["", "nobody"])
def test_drop_keeps_exactly_the_set_for_the_process_and_its_children(
        user: str, launcher: list[str], open_dir: Path) -> None:
    victim = open_dir / "file"
    victim.touch()
    result = _drop_in_child(user, launcher if user else [], victim)
    uid = NOBODY if user else 0
    state = privileges.parse_status(str(result["status"]))
    assert (state.uid, state.effective, state.permitted, state.inheritable, state.bounding,
            state.ambient, state.no_new_privs) == (uid, 0x1400, 0x1400, 0x1400, 0x1400,
                                                   0x1400, True)
    # what it runs (iptables-restore, ip, conntrack) has the same, and nothing more
    child = privileges.parse_status(str(result["child"]))
    assert (child.uid, child.effective, child.permitted, child.bounding, child.ambient,
            child.no_new_privs) == (uid, 0x1400, 0x1400, 0x1400, 0x1400, True)
    assert result["ip_link"] == 0  # CAP_NET_ADMIN works in the child
    assert result["chown"] == "refused"
    assert victim.stat().st_uid == 0
    assert str(result["stderr"]).splitlines() == [
        f"event=privileges user={user or 'root'} uid={uid} gid={uid} "
        "kept=CAP_NET_BIND_SERVICE,CAP_NET_ADMIN bounding=kept no_new_privs=1"]


def test_started_as_the_user_with_ambient_capabilities_nothing_is_switched(
        launcher: list[str], open_dir: Path) -> None:
    """As systemd starts it (User=, AmbientCapabilities=): --user names who it already
    is; the drop sets no-new-privs and leaves the bounding set to systemd."""
    victim = open_dir / "file"
    victim.touch()
    result = _drop_in_child("nobody", [
        *launcher, "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
        "--inh-caps=-all,+net_admin,+net_bind_service",
        "--ambient-caps=-all,+net_admin,+net_bind_service"], victim)
    state = privileges.parse_status(str(result["status"]))
    assert (state.uid, state.effective, state.permitted, state.ambient, state.bounding,
            state.no_new_privs) == (NOBODY, 0x1400, 0x1400, 0x1400, _own().bounding, True)
    assert result["ip_link"] == 0
    assert str(result["stderr"]).splitlines() == [
        f"event=privileges user=nobody uid={NOBODY} gid={NOBODY} "
        "kept=CAP_NET_BIND_SERVICE,CAP_NET_ADMIN bounding=unchanged no_new_privs=1"]


def test_data_dir_is_given_to_the_user_and_back_to_root(open_dir: Path) -> None:
    data = open_dir / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "vips.json").write_text("{}")
    outside = open_dir / "outside"
    outside.touch()
    os.chown(outside, 1234, 1234)
    os.symlink(outside, data / "link")  # links are not followed
    nobody = privileges.resolve_account("nobody")
    everything = [data, data / "sub", data / "sub" / "vips.json", data / "link"]
    privileges.own_data_dir(data, nobody)
    assert {(p.lstat().st_uid, p.lstat().st_gid) for p in everything} == {(NOBODY, 65534)}
    privileges.own_data_dir(data, privileges.ROOT)  # back, as a root agent needs it
    assert {(p.lstat().st_uid, p.lstat().st_gid) for p in everything} == {(0, 0)}
    assert (outside.stat().st_uid, outside.stat().st_gid) == (1234, 1234)
    assert (data / "sub" / "vips.json").read_text() == "{}"


# -- command-line errors ----------------------------------------------------------------------

def _agent_cli(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """``consulate agent`` in a network namespace of its own, with a throwaway data dir."""
    data = tempfile.mkdtemp(prefix="consulate-priv-cli-")
    try:
        return subprocess.run(
            ["unshare", "--net", *prefix, sys.executable, "-m", "consulate.control.cli",
             "agent", "--data-dir", data, "--no-registrator", *args],
            capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(data)


@pytest.mark.parametrize(("args", "message"), [
    (("--user", "no-such-user-xq"), "--user 'no-such-user-xq': no such user on this host "
     "(create it, for example `useradd --system no-such-user-xq`)"),
    (("--user", "nobody", "--group", "no-such-group-xq"),
     "--group 'no-such-group-xq': no such group on this host"),
    (("--group", "nogroup"), "--group 'nogroup' needs --user: give the user to run as"),
    (("--user", "nobody", "--keep-capabilities"), "--keep-capabilities and --user 'nobody': "
     "a user other than root keeps only the capabilities the agent needs; give one of them"),
])
def test_bad_privilege_flags_say_what_to_do(args: tuple[str, ...], message: str) -> None:
    done = _agent_cli(*args)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == f"consulate: error: {message}"


def test_user_without_root_says_what_to_do(launcher: list[str]) -> None:
    done = _agent_cli("--user", "daemon", prefix=(
        *launcher, "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"consulate: error: --user daemon: switching users needs root (the agent runs as "
        f"uid {NOBODY}): start it as root, or as daemon with the capabilities README's "
        "Privileges section lists")


# -- the agent in a lab host ---------------------------------------------------------------

@pytest.fixture(scope="module")
def priv_lab() -> Iterator[labmod.Lab]:
    with labmod.up(hosts=1, containers=3) as built:
        yield built


def _nat(lab: labmod.Lab) -> str:
    return lab.exec("h1", ["iptables-save", "-t", "nat"], capture_output=True, text=True,
                    check=True).stdout


def _thread_states(pid: int) -> list[ProcessPrivileges]:
    return [privileges.parse_status(Path(f"/proc/{pid}/task/{tid}/status").read_text())
            for tid in sorted(os.listdir(f"/proc/{pid}/task"))]


def _expected_mask(relay: str) -> int:
    """What the agent keeps: what it needs, of what this (root) test runner has."""
    needs = privileges.needed_capabilities(native_relay=relay == "native", exec_netns=False,
                                           sk_lookup=True)
    return privileges.mask_of(needs) & _own().permitted


def _route_by_name_and_udp(lab: labmod.Lab, agent: LabAgent) -> None:
    """A TCP connection by name (through DNS on the bridge's port 53 and the proxy), and
    a UDP service's route programmed at run time and used through NFQUEUE."""
    peers = Peers(lab)
    echo = None
    client = None
    try:
        peers.serve("h1c1", "web-1", 8080)
        agent.register("web", "web-1", lab.container_ip(1, 1), 8080)
        vip = agent.api("GET", "/v1/agent/self")["Stats"]["routes"]["services"]["web"]["vip"]
        answer = lab.exec("h1c3", ["dig", "+short", "+tries=1", "+time=2",
                                   "web.service.consul"], capture_output=True, text=True,
                          check=True).stdout
        assert answer.split() == [vip]  # the container's resolver: the bridge, port 53
        [result] = peers.connect("h1c3", "web.service.consul", 80, size=MiB)
        assert result["ok"] and result["echo_ok"] and result["trailer_ok"], result
        assert result["id"] == "web-1"

        echo = lab.popen("h1c2", [sys.executable, "-c", ECHO_SERVER, "7000", "echo-1"],
                         stdout=subprocess.PIPE)
        assert echo.stdout is not None and echo.stdout.readline() == b"listening\n"
        agent.api("PUT", "/v1/agent/service/register",
                  {"ID": "echo-1", "Name": "echo", "Address": lab.container_ip(1, 2),
                   "Port": 7000, "Tags": ["udp"]})
        dnat = (f"-A CONSULATE-UDP -p udp -m mark --mark 0x10000/0xffff0000 -j DNAT "
                f"--to-destination {lab.container_ip(1, 2)}:7000")
        deadline = time.monotonic() + 15
        while dnat not in _nat(lab).splitlines():  # iptables-restore run by the agent
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.05)
        client = FlowClient(lab, "h1c3", "echo.service.consul", 7000)
        assert client.ids("flow-a", 2) == ["echo-1", "echo-1"]
    finally:
        if client is not None:
            client.close()
        if echo is not None:
            echo.kill()
            echo.wait()
            assert echo.stdout is not None
            echo.stdout.close()
        peers.stop_all()


@pytest.mark.parametrize("relay", ["native", "python"])
@pytest.mark.parametrize("user", ["root", "nobody"])
def test_agent_runs_with_only_what_it_needs(priv_lab: labmod.Lab, open_dir: Path,
                                            launcher: list[str], user: str,
                                            relay: str) -> None:
    as_nobody = user == "nobody"
    data = open_dir / "data"
    agent = LabAgent(priv_lab, 1, data, open_dir / "agent.log",
                     extra_args=["--relay", relay, *(["--user", user] if as_nobody else [])],
                     launcher=launcher if as_nobody else [])
    uid = NOBODY if as_nobody else 0
    mask = _expected_mask(relay)
    try:
        agent.start()
        assert agent.process is not None
        threads = _thread_states(agent.process.pid)
        assert len(threads) > 1  # the native engine's, uvloop's: all hold the same
        assert {(t.uid, t.gid, t.effective, t.permitted, t.inheritable, t.bounding, t.ambient,
                 t.no_new_privs) for t in threads} == {(uid, uid, mask, mask, mask, mask, mask,
                                                        True)}
        kept = ",".join(privileges.names_of(mask))
        assert (f"consulate.privileges: event=privileges user={user} uid={uid} gid={uid} "
                f"kept={kept} bounding=kept no_new_privs=1\n") in agent.log()
        if as_nobody:  # the data dir and what the agent wrote there are nobody's
            assert {p.stat().st_uid for p in [data, *data.rglob("*")]} == {NOBODY}
        _route_by_name_and_udp(priv_lab, agent)
    finally:
        code = agent.stop()
    assert code == 0, agent.log()
    assert "CONSULATE" not in _nat(priv_lab)
    assert priv_lab.exec("h1", ["ip", "route", "show", "table", "local", "240.0.0.0/4"],
                         capture_output=True, text=True, check=True).stdout == ""
    assert "event=iptables-removed" in agent.log()


def test_threads_started_before_the_drop_end_with_one_re_exec(
        priv_lab: labmod.Lab, open_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A thread pool started at import (OpenBLAS's, when asked for two threads) would
    keep every capability: the agent runs itself again once, after the drop."""
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    monkeypatch.setenv("CONSULATE_LOG_LEVEL", "debug")
    agent = LabAgent(priv_lab, 1, open_dir / "data", open_dir / "agent.log",
                     extra_args=["--relay", "python"])
    mask = _expected_mask("python")
    try:
        agent.start()
        assert agent.process is not None
        threads = _thread_states(agent.process.pid)
        assert {(t.effective, t.permitted, t.bounding, t.no_new_privs) for t in threads} == {
            (mask, mask, mask, True)}
        log_text = agent.log()
        assert log_text.count("event=privileges-reexec reason=threads") == 1
        assert log_text.count("event=privileges user=root") == 1
    finally:
        assert agent.stop() == 0


def test_keep_capabilities_keeps_them_all(priv_lab: labmod.Lab, open_dir: Path) -> None:
    agent = LabAgent(priv_lab, 1, open_dir / "data", open_dir / "agent.log",
                     extra_args=["--relay", "python", "--keep-capabilities"])
    own = _own()
    try:
        agent.start()
        assert agent.process is not None
        main = _thread_states(agent.process.pid)[0]
        assert (main.uid, main.effective, main.bounding, main.no_new_privs) == (
            0, own.effective, own.bounding, own.no_new_privs)
        assert "event=privileges kept=all reason=--keep-capabilities\n" in agent.log()
    finally:
        assert agent.stop() == 0


def test_legacy_iptables_backend_keeps_cap_net_raw(priv_lab: labmod.Lab, open_dir: Path) -> None:
    """iptables-legacy (x_tables through a raw socket) as the agent's iptables: it keeps
    CAP_NET_RAW, installs its rules, reprograms the UDP chain and removes it all."""
    bin_dir = open_dir / "bin"
    bin_dir.mkdir()
    for name in ("iptables-save", "iptables-restore"):
        os.symlink(f"/usr/sbin/{name.replace('iptables', 'iptables-legacy')}", bin_dir / name)
    agent = LabAgent(priv_lab, 1, open_dir / "data", open_dir / "agent.log",
                     extra_args=["--relay", "python"],
                     launcher=["env", f"PATH={bin_dir}:{os.environ['PATH']}"])

    def legacy_nat() -> str:
        return priv_lab.exec("h1", ["iptables-legacy-save", "-t", "nat"], capture_output=True,
                             text=True, check=True).stdout

    mask = privileges.mask_of(BASE | {CAP_NET_RAW, CAP_BPF}) & _own().permitted
    try:
        agent.start()
        assert agent.process is not None
        assert {t.effective for t in _thread_states(agent.process.pid)} == {mask}
        assert ("-A CONSULATE-OUTPUT -d 240.0.0.0/4 -p udp -j CONSULATE-UDP"
                in legacy_nat().splitlines())
        agent.api("PUT", "/v1/agent/service/register",
                  {"ID": "echo-1", "Name": "echo", "Address": priv_lab.container_ip(1, 2),
                   "Port": 7000, "Tags": ["udp"]})
        dnat = (f"-A CONSULATE-UDP -p udp -m mark --mark 0x10000/0xffff0000 -j DNAT "
                f"--to-destination {priv_lab.container_ip(1, 2)}:7000")
        deadline = time.monotonic() + 15
        while dnat not in legacy_nat().splitlines():
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.05)
    finally:
        code = agent.stop()
    assert code == 0, agent.log()
    assert "CONSULATE" not in legacy_nat()
