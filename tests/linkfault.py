"""Packet loss and delay on a lab host's link, inside its namespace only.

The kernel here has no ``sch_netem`` (``tc qdisc add ... netem`` answers "Specified
qdisc kind is unknown"), so the faults ``tc netem`` would make are made with
netfilter in the host's namespace instead, on what arrives from the fabric
(eth0): loss is a DROP rule (``-m statistic`` for a share of the packets), delay
is an NFQUEUE rule whose packets this module, run as a process in that namespace
(``python linkfault.py delay``), lets through only after the delay. Every rule
lives in a chain of its own (LAB-FAULT) in the filter table of that namespace,
never in the root namespace's.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from pathlib import Path

from consulate.control.lab import Lab

CHAIN = "LAB-FAULT"
QUEUE = 7  # NFQUEUE numbers are per namespace: no other process of this host uses 7
# Where packets from the fabric pass: to the host itself, and on to its containers.
HOOKS = ("INPUT", "FORWARD")


class LinkFault:
    """Faults on what reaches host ``h<host>`` over its link; ``clear`` ends them all."""

    def __init__(self, lab: Lab, host: int) -> None:
        self.lab = lab
        self.where = f"h{host}"
        self._delayer: subprocess.Popen[bytes] | None = None

    def _iptables(self, *args: str) -> None:
        self.lab.exec(self.where, ["iptables", "-w", *args], check=True)

    def _rule(self, *target: str) -> None:
        """One rule in the chain, hooked on eth0 (after ``clear``)."""
        self._iptables("-N", CHAIN)
        self._iptables("-A", CHAIN, *target)
        for hook in HOOKS:
            self._iptables("-I", hook, "-i", "eth0", "-j", CHAIN)

    def loss(self, share: float = 1.0) -> None:
        """Drop ``share`` of the packets arriving over the link (1.0: all of them)."""
        sample = [] if share >= 1 else ["-m", "statistic", "--mode", "random",
                                        "--probability", f"{share:.4f}"]
        self.clear()
        self._rule(*sample, "-j", "DROP")

    def delay(self, seconds: float) -> None:
        """Hold every packet arriving over the link for ``seconds``."""
        self.clear()
        self._delayer = self.lab.popen(
            self.where, [sys.executable, str(Path(__file__)), "delay", "--queue", str(QUEUE),
                         "--seconds", str(seconds)], stdout=subprocess.PIPE)
        assert self._delayer.stdout is not None
        assert self._delayer.stdout.readline() == b"ready\n", "the delayer did not start"
        self._rule("-j", "NFQUEUE", "--queue-num", str(QUEUE))

    def clear(self) -> None:
        """Remove the chain and its hooks, then stop the delayer (by its PID)."""
        for hook in HOOKS:
            while self.lab.exec(self.where, ["iptables", "-w", "-D", hook, "-i", "eth0", "-j",
                                             CHAIN], capture_output=True).returncode == 0:
                pass
        for step in ("-F", "-X"):
            self.lab.exec(self.where, ["iptables", "-w", step, CHAIN], capture_output=True)
        if self._delayer is not None:
            self._delayer.kill()
            self._delayer.wait()
            assert self._delayer.stdout is not None
            self._delayer.stdout.close()
            self._delayer = None


async def _delay(queue_num: int, seconds: float) -> None:
    """Accept each queued packet ``seconds`` after it arrived, in arrival order."""
    from netfilterqueue import NetfilterQueue, Packet

    loop = asyncio.get_running_loop()

    def hold(packet: Packet) -> None:
        packet.retain()
        loop.call_later(seconds, packet.accept)

    queue = NetfilterQueue()
    queue.bind(queue_num, hold)
    loop.add_reader(queue.get_fd(), queue.run, False)
    print("ready", flush=True)
    await asyncio.Event().wait()  # until killed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    delay = sub.add_parser("delay", help="hold the packets of an NFQUEUE for a while")
    delay.add_argument("--queue", type=int, required=True)
    delay.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args()
    asyncio.run(_delay(args.queue, args.seconds))


if __name__ == "__main__":
    main()
