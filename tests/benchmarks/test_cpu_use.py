"""benchmarks/cpu_use.py says where the CPU went over an arm: a server's group counts its descendants (the
engine core is a server's child), and the machine's steal is the hypervisor's share, apart from busy."""

from __future__ import annotations

import subprocess
import sys
import time
from types import SimpleNamespace

import psutil

from ..scripts import load_script

cpu_use = load_script("benchmarks/cpu_use.py", "cpu_use_under_test")
WINDOW_S = 1.0


def test_a_groups_cpu_includes_its_grandchildren_and_an_idle_group_gets_none():
    # The busy loop runs in a grandchild, as vLLM's engine core does under the API server; the shell
    # between them does no work of its own. It outlasts the window.
    burn = f"import time\nend = time.time() + {4 * WINDOW_S}\nwhile time.time() < end: pass"
    busy = subprocess.Popen(["bash", "-c", f'{sys.executable} -c "{burn}"; true'])
    idle = subprocess.Popen(["bash", "-c", "sleep 5; true"])
    try:
        time.sleep(0.3)  # the grandchild has started
        with cpu_use.CpuUse({"busy": busy.pid, "idle": idle.pid}) as use:
            time.sleep(WINDOW_S)
    finally:
        for proc in (busy, idle):
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait()
    # One core's loop, on a machine that may be busy with other tests: well over a third of a core.
    assert use.result["groups"]["busy"] > 0.35
    assert use.result["leaders"]["busy"] < 0.05  # the shell itself only waits
    assert use.result["groups"]["idle"] < 0.05
    assert use.result["busy"] >= use.result["groups"]["busy"] - 0.1
    # other = busy less the groups (each rounded to 0.01 on its own)
    assert abs(use.result["other"] - (use.result["busy"] - sum(use.result["groups"].values()))) <= 0.02
    line = cpu_use.cpu_line(use.result)
    assert f"busy {use.result['groups']['busy']:.2f} [{use.result['leaders']['busy']:.2f} itself]" in line
    assert f"steal {use.result['steal']:.2f}" in line


def times(**fields: float) -> SimpleNamespace:
    base = dict(user=0.0, nice=0.0, system=0.0, idle=0.0, iowait=0.0, irq=0.0, softirq=0.0, steal=0.0)
    return SimpleNamespace(**{**base, **fields})


def test_steal_is_the_hypervisors_share_of_the_window_in_cores_apart_from_busy_and_idle():
    before = times(user=100, system=50, idle=1000, steal=10)
    # 40 s of the window's 100 core-seconds worked (30 user, 10 system), 35 idle (30 + 5 iowait), 25 stolen.
    after = times(user=130, system=60, idle=1030, iowait=5, steal=35)
    cores = cpu_use.machine_cores(before, after, cores=2)
    assert cores == {"busy": 0.8, "idle": 0.7, "steal": 0.5}
    assert cpu_use.machine_cores(before, before, cores=2) == {"busy": 0.0, "idle": 0.0, "steal": 0.0}
