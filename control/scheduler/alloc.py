"""An allocation: one placed copy of a task group, its lifecycle and its history.

The client status follows Nomad's names; the legal moves are one table, and an
illegal move raises (a bug in the caller, never a silent overwrite):

    pending -> running | restarting | failed | lost | complete
    running -> restarting | complete | failed | lost
    restarting -> running | failed | lost | complete
    complete, failed, lost: terminal

``desired`` is what the scheduler wants (run or stop); the agent reports the
client status. Every move is kept in ``history`` with its time and reason.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from consulate.control.scheduler.explain import Explanation

TRANSITIONS: dict[str, frozenset[str]] = {
    "pending": frozenset({"running", "restarting", "failed", "lost", "complete"}),
    "running": frozenset({"restarting", "complete", "failed", "lost"}),
    "restarting": frozenset({"running", "failed", "lost", "complete"}),
    "complete": frozenset(),
    "failed": frozenset(),
    "lost": frozenset(),
}
TERMINAL = frozenset(s for s, moves in TRANSITIONS.items() if not moves)


class IllegalTransition(RuntimeError):
    """A caller tried a move the lifecycle table forbids (a scheduler bug)."""


@dataclass(frozen=True)
class HistoryEntry:
    at: float
    status: str
    detail: str


@dataclass
class Allocation:
    job: str
    group: str
    index: int
    node: str
    cpu: int
    memory: int
    ports: dict[str, int] = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    desired: str = "run"
    status: str = "pending"
    restarts: int = 0
    previous: str = ""  # the allocation this one replaces
    version: str = ""  # the group definition it runs (Group.version)
    explanation: Explanation | None = None
    history: list[HistoryEntry] = field(default_factory=list)

    @property
    def name(self) -> str:
        """Nomad's allocation name: ``<job>.<group>[<index>]``."""
        return f"{self.job}.{self.group}[{self.index}]"

    @property
    def short_id(self) -> str:
        return self.id[:8]

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def move(self, status: str, detail: str, now: float | None = None) -> None:
        if status not in TRANSITIONS[self.status]:
            raise IllegalTransition(f"allocation {self.short_id}: {self.status} -> {status} "
                                    "is not a legal move")
        self.status = status
        self.history.append(HistoryEntry(time.time() if now is None else now, status, detail))

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "job": self.job, "group": self.group,
                "index": self.index,
                "node": self.node, "desired": self.desired, "status": self.status,
                "restarts": self.restarts, "previous": self.previous, "version": self.version,
                "resources": {"cpu": self.cpu, "memory": self.memory}, "ports": self.ports,
                "history": [{"at": round(h.at, 3), "status": h.status, "detail": h.detail}
                            for h in self.history]}

    @staticmethod
    def from_json(data: dict[str, Any]) -> Allocation:
        """An allocation as ``to_json`` wrote it (its explanation is not kept)."""
        return Allocation(
            job=data["job"], group=data["group"], index=int(data["index"]),
            node=data["node"], cpu=int(data["resources"]["cpu"]),
            memory=int(data["resources"]["memory"]), ports=dict(data["ports"]), id=data["id"],
            desired=data["desired"], status=data["status"], restarts=int(data["restarts"]),
            previous=data["previous"], version=data["version"],
            history=[HistoryEntry(float(h["at"]), h["status"], h["detail"])
                     for h in data["history"]])
