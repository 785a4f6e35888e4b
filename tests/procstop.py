"""The tests' name for consulate.control.procstop (stopping a process by its PID)."""

from consulate.control.procstop import stop_process

__all__ = ["stop_process"]
