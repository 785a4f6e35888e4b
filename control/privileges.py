"""Privileges: the agent keeps only the Linux capabilities it uses, optionally as another user.

What the running agent needs, and why (nothing else; README "Privileges"):

- ``CAP_NET_ADMIN``: iptables-restore at start, again whenever a UDP service's endpoints
  change (``CONSULATE-UDP``), and at exit to remove the rules; ``ip route`` for the VIP
  route; ``conntrack -D`` when a UDP endpoint leaves; NFQUEUE verdicts (nfnetlink checks
  it on every message); ``SO_MARK`` on upstream sockets to an endpoint inside the VIP
  range (both relays), which the OUTPUT rules must not redirect.
- ``CAP_NET_BIND_SERVICE``: DNS on port 53 (and any other listener below 1024).
- ``CAP_NET_RAW``, with iptables' legacy backend only: it reaches x_tables through a raw
  socket (nf_tables, Debian's default, uses netlink).
- ``CAP_SYS_RESOURCE``, with the native relay only: its 1 MiB splice pipes. Without it
  the kernel caps one user's pipes at ``fs.pipe-user-pages-soft`` (64 MiB: 64 such
  pipes), after which F_SETPIPE_SZ is refused and new pipes hold 8 KiB.
- ``CAP_SYS_ADMIN``, with ``--scheduler-exec-netns`` only: ``nsenter --net`` (setns).
- ``CAP_BPF``, with ``--tcp-intercept`` sk-lookup or auto: loading the sk_lookup
  program and its socket map at start (attaching it takes ``CAP_NET_ADMIN``).

Capabilities are per thread, and a thread inherits its creator's: the drop is done
before the agent starts (its threads, the native engine's among them, then hold no
more than this set; threads started at import are ended by a re-exec, see ``drop``).
Start-up needs nothing beyond the set, so nothing is lost by dropping first. The
set is also made ambient, so the programs the agent runs (iptables-restore, ip,
conntrack) get it when the agent is not root; no-new-privs stops any of them
gaining more.

Pure part (the capability table, what to keep, /proc/<pid>/status parsing) is
separate from the calls into the kernel (prctl, capset, setuid), made with ctypes.
"""

from __future__ import annotations

import ctypes
import grp
import logging
import os
import pwd
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from consulate import native
from consulate.control.config import AgentConfig
from consulate.proxy.sklookup import REDIRECT

log = logging.getLogger("consulate.privileges")

# linux/capability.h, in order (0 .. CAP_CHECKPOINT_RESTORE = 40)
CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
    "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)
_NUMBER = {name: number for number, name in enumerate(CAPABILITIES)}
CAP_NET_BIND_SERVICE = _NUMBER["CAP_NET_BIND_SERVICE"]
CAP_NET_ADMIN = _NUMBER["CAP_NET_ADMIN"]
CAP_NET_RAW = _NUMBER["CAP_NET_RAW"]
CAP_SETPCAP = _NUMBER["CAP_SETPCAP"]
CAP_SYS_ADMIN = _NUMBER["CAP_SYS_ADMIN"]
CAP_SYS_RESOURCE = _NUMBER["CAP_SYS_RESOURCE"]
CAP_BPF = _NUMBER["CAP_BPF"]

# linux/prctl.h and linux/capability.h
_PR_SET_KEEPCAPS = 8
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_RAISE = 2
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class PrivilegeError(Exception):
    """The agent could not take the user or the capabilities asked; the message says why."""


@dataclass(frozen=True)
class ProcessPrivileges:
    """A process's ids and capability sets (bit masks), as /proc/<pid>/status shows them."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    inheritable: int
    permitted: int
    effective: int
    bounding: int
    ambient: int
    no_new_privs: bool


@dataclass(frozen=True)
class Account:
    """The user (and group) ``--user``/``--group`` name, resolved."""

    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary: the user's groups (docker's, for its socket)


def needed_capabilities(*, native_relay: bool, exec_netns: bool,
                        legacy_iptables: bool = False, sk_lookup: bool = False) -> frozenset[int]:
    """What the running agent uses (see the module docstring for each one's reason)."""
    needed = {CAP_NET_ADMIN, CAP_NET_BIND_SERVICE}
    if sk_lookup:
        needed.add(CAP_BPF)
    if legacy_iptables:
        needed.add(CAP_NET_RAW)
    if native_relay:
        needed.add(CAP_SYS_RESOURCE)
    if exec_netns:
        needed.add(CAP_SYS_ADMIN)
    return frozenset(needed)


def is_legacy_iptables(version_output: str) -> bool:
    """Whether ``iptables-restore --version`` names the legacy backend (x_tables through
    a raw socket) rather than nf_tables (netlink): ``iptables-restore v1.8.9 (legacy)``."""
    return version_output.strip().endswith("(legacy)")


def mask_of(capabilities: Iterable[int]) -> int:
    mask = 0
    for number in capabilities:
        mask |= 1 << number
    return mask


def names_of(mask: int) -> list[str]:
    """The capability names of ``mask``, lowest first (``CAP_<n>`` for one we do not know)."""
    return [CAPABILITIES[n] if n < len(CAPABILITIES) else f"CAP_{n}"
            for n in range(mask.bit_length()) if mask >> n & 1]


def parse_status(text: str) -> ProcessPrivileges:
    """The ids and capability sets of a /proc/<pid>/status text."""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def value(key: str) -> str:
        if key not in fields:
            raise ValueError(f"/proc status has no {key} line")
        return fields[key].strip()

    def hexmask(key: str) -> int:
        return int(value(key), 16)

    return ProcessPrivileges(
        uid=int(value("Uid").split()[1]), gid=int(value("Gid").split()[1]),
        groups=tuple(int(g) for g in value("Groups").split()),
        inheritable=hexmask("CapInh"), permitted=hexmask("CapPrm"),
        effective=hexmask("CapEff"), bounding=hexmask("CapBnd"), ambient=hexmask("CapAmb"),
        no_new_privs=value("NoNewPrivs") == "1",
    )


def resolve_account(user: str, group: str = "") -> Account:
    """``--user``/``--group`` as ids; the group defaults to the user's primary one."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"--user {user!r}: no such user on this host (create it, for "
                             f"example `useradd --system {user}`)") from None
    gid = entry.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise PrivilegeError(f"--group {group!r}: no such group on this host") from None
    groups = os.getgrouplist(entry.pw_name, gid)
    return Account(entry.pw_name, entry.pw_uid, gid, tuple(sorted(set(groups))))


ROOT = Account("root", 0, 0, ())


def own_data_dir(data_dir: Path, account: Account) -> None:
    """Give ``data_dir`` and what is in it (the registry, VIPs, services) to ``account``,
    as Consul's packages give /opt/consul to the consul user; links are not followed.
    Root too needs it back from an earlier ``--user``: without CAP_DAC_OVERRIDE it
    may not write another user's files."""
    owner = (account.uid, account.gid)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        paths = [str(data_dir)]
        for top, dirs, files in os.walk(data_dir):
            paths += (os.path.join(top, name) for name in (*dirs, *files))
        for path in paths:
            found = os.lstat(path)
            if (found.st_uid, found.st_gid) != owner:
                os.lchown(path, *owner)
    except OSError as exc:
        raise PrivilegeError(f"--data-dir {str(data_dir)!r} cannot be given to "
                             f"{account.user} ({exc.strerror}): chown it to them") from None


def current() -> ProcessPrivileges:
    """This thread's ids and capability sets."""
    return parse_status(Path("/proc/thread-self/status").read_text())


def is_dropped(state: ProcessPrivileges, keep: frozenset[int], uid: int | None) -> bool:
    """Whether ``state`` already holds no capability beyond ``keep``, as ``uid`` when given,
    with no-new-privs: as the drop leaves it, or as systemd's unit set it up."""
    return (state.effective | state.permitted | state.ambient) & ~mask_of(keep) == 0 and (
        state.no_new_privs and (uid is None or state.uid == uid))


def drop(keep: frozenset[int], account: Account | None = None) -> ProcessPrivileges:
    """Keep only ``keep`` (those of them this process has), as ``account`` when given;
    set no-new-privs; log what was kept. A capability set is per thread: when other
    threads already run (a library that starts a pool at import), the process
    re-executes itself after the drop, since execve leaves only the calling thread,
    whose capabilities the new image keeps (ambient ones; root's, limited by
    no-new-privs); that run finds the drop done. Threads started later inherit it.
    A process that held nothing more (only no-new-privs was missing) is not re-run."""
    if account is not None and (account.uid, account.gid) == (os.getuid(), os.getgid()):
        account = None  # started as that user already (systemd's User=): nothing to switch
    state = current()
    if not is_dropped(state, keep, account.uid if account is not None else None):
        holds_more = (state.effective | state.permitted | state.ambient) & ~mask_of(keep)
        _drop_here(keep, account, state)
        if (holds_more or account is not None) and len(os.listdir("/proc/self/task")) > 1:
            log.debug("event=privileges-reexec reason=threads")
            _reexec(state.uid if account is None else account.uid)
        state = current()
    log.info("event=privileges user=%s uid=%d gid=%d kept=%s bounding=%s no_new_privs=1",
             _user_name(state.uid), state.uid, state.gid,
             ",".join(names_of(state.effective)) or "none",
             "kept" if state.bounding == state.effective else "unchanged")
    return state


def _drop_here(keep: frozenset[int], account: Account | None, before: ProcessPrivileges) -> None:
    """The drop, in this thread: bounding set, user, capability sets, ambient, no-new-privs."""
    if account is not None and os.geteuid() != 0:
        raise PrivilegeError(f"--user {account.user}: switching users needs root (the agent "
                             f"runs as uid {os.geteuid()}): start it as root, or as "
                             f"{account.user} with the capabilities README's Privileges "
                             "section lists")
    kept = mask_of(keep) & before.permitted
    limit_bounding = bool(before.effective >> CAP_SETPCAP & 1)
    if limit_bounding:  # else the bounding set is whoever started us's (systemd's) job
        for number in range(_last_capability() + 1):
            if not kept >> number & 1:
                _prctl(_PR_CAPBSET_DROP, number, what=f"drop {names_of(1 << number)[0]}")
    if account is not None:
        _switch_user(account)
    _capset(kept)
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, what="clear the ambient set")
    for number in range(kept.bit_length()):
        if kept >> number & 1:  # so that iptables-restore, ip, conntrack get them too
            _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, number,
                   what=f"make {CAPABILITIES[number]} ambient")
    _prctl(_PR_SET_NO_NEW_PRIVS, 1, what="set no-new-privs")
    after = current()
    if not is_dropped(after, keep, account.uid if account is not None else None) or (
            limit_bounding and after.bounding != kept):
        raise PrivilegeError(f"privileges not as asked after the drop: uid={after.uid} "
                             f"effective={after.effective:#x} bounding={after.bounding:#x}")


def _reexec(uid: int) -> NoReturn:
    """This program again, as it was started: its other threads end with the exec."""
    try:
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    except OSError as exc:
        raise PrivilegeError(f"cannot run {sys.executable} again as uid {uid} ({exc.strerror}), "
                             "to end the threads that kept their capabilities: install "
                             "Python where that user may run it") from None


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:  # a uid without a passwd entry (in a container, say)
        return str(uid)


def _switch_user(account: Account) -> None:
    """setgroups/setgid/setuid, keeping the permitted capabilities across the uid change."""
    _prctl(_PR_SET_KEEPCAPS, 1, what="keep capabilities across setuid")
    try:
        os.setgroups(list(account.groups))
        os.setgid(account.gid)
        os.setuid(account.uid)
    except OSError as exc:
        raise PrivilegeError(f"--user {account.user}: cannot switch to uid {account.uid} "
                             f"gid {account.gid} ({exc.strerror}): the agent needs "
                             "CAP_SETUID and CAP_SETGID to do it") from None
    _prctl(_PR_SET_KEEPCAPS, 0, what="reset keep-capabilities")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)


def _capset(mask: int) -> None:
    """Effective, permitted and inheritable all become ``mask`` (a version 3 capset)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        word = mask >> (32 * i) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = data[i].inheritable = word
    if _libc.capset(ctypes.byref(header), data) != 0:
        _raise_errno(f"capset {','.join(names_of(mask)) or 'none'}")


def _prctl(option: int, arg2: int, arg3: int = 0, *, what: str) -> None:
    args = [ctypes.c_ulong(a) for a in (arg2, arg3, 0, 0)]
    if _libc.prctl(ctypes.c_int(option), *args) != 0:
        _raise_errno(what)


def _raise_errno(what: str) -> None:
    errno = ctypes.get_errno()
    raise PrivilegeError(f"cannot {what}: {os.strerror(errno)}")


def _last_capability() -> int:
    """The highest capability this kernel knows (newer kernels add some)."""
    return int(Path("/proc/sys/kernel/cap_last_cap").read_text())


def agent_needs(config: AgentConfig) -> frozenset[int]:
    """The capabilities ``config``'s agent uses once started."""
    native_relay = config.relay == "native" or (config.relay == "auto"
                                                and native.capabilities().splice)
    return needed_capabilities(native_relay=native_relay,
                               exec_netns=bool(config.scheduler and config.scheduler_exec_netns),
                               legacy_iptables=config.iptables and _iptables_is_legacy(),
                               sk_lookup=config.iptables and config.tcp_intercept != REDIRECT)


def _iptables_is_legacy() -> bool:
    try:
        done = subprocess.run(["iptables-restore", "--version"], capture_output=True,
                              text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False  # missing: the agent says what to install when it needs it
    return is_legacy_iptables(done.stdout)


def drop_for_agent(config: AgentConfig) -> ProcessPrivileges | None:
    """The agent's drop, before it starts: ``--user``'s account gets the data dir;
    ``--keep-capabilities`` keeps everything (None)."""
    config.validate()
    if config.keep_capabilities:
        log.info("event=privileges kept=all reason=--keep-capabilities")
        return None
    account = resolve_account(config.user, config.group) if config.user else None
    if os.geteuid() == 0:
        own_data_dir(config.data_dir, account or ROOT)
    return drop(agent_needs(config), account)
