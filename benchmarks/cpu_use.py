"""Where the machine's CPU went while an arm ran: its own processes, each server, and the hypervisor.

benchmarks/brownout.py runs its arms one after another, and on a shared machine a neighbour's load
between two arms moves their attainment by more than the targets allow. The probe before each arm
(three unloaded requests, about 1.5 s) is a snapshot; this covers the whole arm. It tells two causes
apart: *steal*, the time this virtual machine was ready to run and the hypervisor ran another one (a
neighbour no process list shows), and the benchmark's own processes (each server's process group, and
the rest: locust, the benchmark, anything else on the machine). Counts are in cores: CPU seconds over
wall seconds. No vLLM or locust import here, so the tests can load it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import psutil

# psutil.cpu_times() fields that are time the cores did work for this machine (guest time is already in
# user on Linux). idle and iowait are time they had nothing to do; steal, time the hypervisor gave away.
BUSY_FIELDS = ("user", "nice", "system", "irq", "softirq")
IDLE_FIELDS = ("idle", "iowait")


def group_seconds(pid: int) -> tuple[float, float]:
    """User + system CPU seconds of a process itself and of every descendant it has now (a server's engine
    core is its child, the API server the process itself); zeros if it is gone. A descendant that exited
    in between takes its seconds with it."""
    try:
        root = psutil.Process(pid)
        descendants = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0, 0.0

    def seconds(proc: psutil.Process) -> float:
        try:
            t = proc.cpu_times()
        except psutil.NoSuchProcess:
            return 0.0
        return t.user + t.system

    return seconds(root), sum(seconds(proc) for proc in descendants)


def machine_cores(before: Any, after: Any, cores: int) -> dict[str, float]:
    """Busy, idle and stolen cores between two psutil.cpu_times() readings: each field's share of all the
    time the cores accounted for, times the number of cores."""
    fields = (*BUSY_FIELDS, *IDLE_FIELDS, "steal")
    delta = {f: getattr(after, f, 0.0) - getattr(before, f, 0.0) for f in fields}
    total = sum(delta.values())
    if total <= 0:
        return {"busy": 0.0, "idle": 0.0, "steal": 0.0}
    share = {f: d / total * cores for f, d in delta.items()}
    return {"busy": sum(share[f] for f in BUSY_FIELDS), "idle": sum(share[f] for f in IDLE_FIELDS),
            "steal": share["steal"]}


class CpuUse:
    """``with CpuUse({"tiers": pid, ...}) as use: ...``; then ``use.result`` is the window's cores: busy,
    idle and steal for the machine; each group's (a process and its descendants) in ``groups``, and in
    ``leaders`` the part of it that the group's first process used itself (a server's API process, apart
    from its engine); and ``other`` (busy less the groups: locust, the benchmark itself, and any process
    not in a group)."""

    def __init__(self, groups: Mapping[str, int]) -> None:
        self.groups = dict(groups)
        self.result: dict[str, Any] = {}

    def __enter__(self) -> "CpuUse":
        self._start = time.monotonic()
        self._machine = psutil.cpu_times()
        self._groups = {name: group_seconds(pid) for name, pid in self.groups.items()}
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.monotonic() - self._start
        machine = machine_cores(self._machine, psutil.cpu_times(), psutil.cpu_count() or 1)
        per_s = 1.0 / wall if wall > 0 else 0.0
        leaders, groups = {}, {}
        for name, pid in self.groups.items():
            (leader0, rest0), (leader1, rest1) = self._groups[name], group_seconds(pid)
            leaders[name] = (leader1 - leader0) * per_s
            groups[name] = leaders[name] + (rest1 - rest0) * per_s
        self.result = {"wall_s": round(wall, 1), **{k: round(v, 2) for k, v in machine.items()},
                       "groups": {k: round(v, 2) for k, v in groups.items()},
                       "leaders": {k: round(v, 2) for k, v in leaders.items()},
                       "other": round(machine["busy"] - sum(groups.values()), 2)}


def cpu_line(use: Mapping[str, Any]) -> str:
    """One arm's window, for the log: 'busy 1.62 cores (tiers 1.10 [0.45 itself], overload 0.02 [0.01 itself],
    other 0.50), idle 0.30, steal 0.08'."""
    groups = ", ".join(f"{name} {cores:.2f} [{use['leaders'][name]:.2f} itself]"
                       for name, cores in use["groups"].items())
    return (f"busy {use['busy']:.2f} cores ({groups}{', ' if groups else ''}other {use['other']:.2f}), "
            f"idle {use['idle']:.2f}, steal {use['steal']:.2f}")
