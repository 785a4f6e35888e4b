"""BPF sk_lookup steering (proxy/sklookup.py): the program as assembled, and the real
kernel handing connections for a VIP range, any port, to one listener in a lab
namespace (from a container and from the host itself), nothing else steered."""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from consulate.control import lab as labmod
from consulate.proxy import sklookup

PROBE = str(Path(__file__).with_name("sklookup_probe.py"))
VIPS = "240.0.0.0/4"


def _decode(code: bytes) -> list[tuple[int, int, int, int, int]]:
    """(opcode, dst, src, offset, imm) of each 8-byte instruction."""
    out = []
    for i in range(0, len(code), 8):
        op, regs, off, imm = struct.unpack("<BBhi", code[i:i + 8])
        out.append((op, regs & 0xF, regs >> 4, off, imm))
    return out


@pytest.mark.parametrize("cidr", ["240.0.0.0/4", "10.32.0.0/11", "192.168.7.128/25"])
def test_program_compares_the_local_address_with_the_network_in_memory_order(
        cidr: str) -> None:
    network = ipaddress.IPv4Network(cidr)
    insns = _decode(sklookup.program(network, map_fd=9))
    # w2 = ctx->local_ip4 (offset 40), w2 &= mask, if w2 != network goto pass
    load = insns.index((0x61, 2, 6, 40, 0))
    and_op, _, _, _, mask = insns[load + 1]
    jne, _, _, _, net = insns[load + 2]
    assert (and_op, jne) == (0x54, 0x56)
    as_loaded = struct.unpack("<I", network.netmask.packed)[0]  # x86/arm64: little-endian
    assert mask & 0xFFFFFFFF == as_loaded
    assert net & 0xFFFFFFFF == struct.unpack("<I", network.network_address.packed)[0]


def test_program_checks_tcp_and_ipv4_and_every_early_exit_returns_pass() -> None:
    insns = _decode(sklookup.program(ipaddress.IPv4Network(VIPS), map_fd=9))
    assert insns[-2:] == [(0xB7, 0, 0, 0, 1), (0x95, 0, 0, 0, 0)]  # r0 = SK_PASS; exit
    pass_at = len(insns) - 2
    jumps = [(i, insn) for i, insn in enumerate(insns) if insn[0] in (0x56, 0x15)]
    assert [insn[4] for _, insn in jumps[:2]] == [socket.IPPROTO_TCP, socket.AF_INET]
    assert all(i + 1 + insn[3] == pass_at for i, insn in jumps)
    # the map is referenced by its descriptor (BPF_PSEUDO_MAP_FD) in a 64-bit load
    assert (0x18, 1, 1, 0, 9) in insns
    # the helpers, in order: map lookup, sk_assign, sk_release
    assert [insn[4] for insn in insns if insn[0] == 0x85] == [1, 124, 86]


@pytest.mark.parametrize(("err", "says"), [
    (errno.EPERM, "the agent needs CAP_BPF and CAP_NET_ADMIN (run it as root), or use "
                  "--tcp-intercept redirect"),
    (errno.EINVAL, "this kernel has no BPF sk_lookup (Linux 5.9 or later has it), or use "
                   "--tcp-intercept redirect"),
    (errno.EBADF, "use --tcp-intercept redirect"),
])
def test_refusals_say_what_to_do(err: int, says: str) -> None:
    refused = sklookup._refused(OSError(err, "why"), "load its program")
    assert refused.errno == err
    assert str(refused).endswith(f"could not load its program (why): {says}")


def test_a_program_the_verifier_refuses_is_reported_with_its_log() -> None:
    # r0 never set before exit: loading only (nothing is attached anywhere)
    bad = struct.pack("<BBhi", 0x95, 0, 0, 0)
    with pytest.raises(sklookup.SkLookupError) as refused:
        sklookup._load(sklookup._Bpf(), bad)
    assert refused.value.errno == errno.EACCES
    assert str(refused.value).startswith(
        "the kernel refused the sk_lookup program (Permission denied): ")
    assert "R0 !read_ok" in str(refused.value)
    assert str(refused.value).endswith("; use --tcp-intercept redirect")


@pytest.fixture(scope="module")
def lab() -> Iterator[labmod.Lab]:
    with labmod.up(hosts=1, containers=1) as built:
        built.exec("h1", ["ip", "route", "add", "local", VIPS, "dev", "lo"], check=True)
        yield built


@pytest.fixture()
def probe(lab: labmod.Lab) -> Iterator[subprocess.Popen[str]]:
    process = lab.popen("h1", [sys.executable, PROBE, VIPS], stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stderr is not None
        assert process.stdout.readline() == "ready\n", process.stderr.read()
        yield process
    finally:
        process.kill()
        process.communicate(timeout=10)  # and closes its pipes


def _tcp(lab: labmod.Lab, where: str, host: str, port: int) -> str:
    """One connection from ``where``: the line it got, or the error's name."""
    script = ("import socket,sys\n"
              "try:\n"
              f"    s = socket.create_connection(({host!r}, {port}), timeout=3)\n"
              "    print(s.makefile().readline().strip())\n"
              "except OSError as e:\n"
              "    print(type(e).__name__)\n")
    done = lab.exec(where, [sys.executable, "-c", script], capture_output=True, text=True,
                    timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_connections_to_any_vip_and_port_reach_the_listener_unchanged(
        lab: labmod.Lab, probe: subprocess.Popen[str]) -> None:
    client = lab.container_ip(1, 1)
    for vip, port in (("240.0.0.1", 80), ("241.2.3.4", 5432), ("255.255.255.254", 1)):
        line = _tcp(lab, "h1c1", vip, port)
        assert line.startswith(f"sockname={vip}:{port} peer={client}:"), line
    # the host's own processes too (through lo: the VIP is its own source address)
    line = _tcp(lab, "h1", "240.9.9.9", 443)
    assert line.startswith("sockname=240.9.9.9:443 peer=240.9.9.9:"), line


def test_nothing_outside_the_range_nor_udp_is_steered(
        lab: labmod.Lab, probe: subprocess.Popen[str]) -> None:
    assert _tcp(lab, "h1c1", lab.bridge_ip(1), 81) == "ConnectionRefusedError"
    script = ("import socket\n"
              "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)\n"
              "s.connect(('240.0.0.1', 53)); s.send(b'x')\n"
              "try:\n    s.recv(1); print('answered')\n"
              "except OSError as e:\n    print(type(e).__name__)\n")
    done = lab.exec("h1", [sys.executable, "-c", script], capture_output=True, text=True,
                    timeout=30)
    assert done.stdout.strip() == "ConnectionRefusedError", done.stderr


def test_the_steering_ends_with_the_process(lab: labmod.Lab,
                                            probe: subprocess.Popen[str]) -> None:
    assert _tcp(lab, "h1c1", "240.0.0.1", 80).startswith("sockname=240.0.0.1:80 ")
    probe.kill()
    probe.communicate(timeout=10)
    assert _tcp(lab, "h1c1", "240.0.0.1", 80) == "ConnectionRefusedError"
