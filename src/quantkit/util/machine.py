"""What a measurement ran on: the machine, and the memory figures of this process."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any


def vm_kib(field_name: str) -> int:
    """A /proc/self/status field in KiB ("VmRSS", "VmHWM"); 0 where there is none."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def machine_info(n_threads: int) -> dict[str, Any]:
    """CPU, cores, memory, OS and the versions of quantkit and its runtimes, for a result's meta."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    from .. import __version__
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": n_threads, "memory_bytes": mem,
            "os": platform.platform(), "python": platform.python_version(), "quantkit": __version__}
    try:
        import llama_cpp
        info["llama_cpp_python"] = llama_cpp.__version__
    except ImportError:
        pass
    if "torch" in sys.modules:
        info["torch"] = sys.modules["torch"].__version__
    if "transformers" in sys.modules:
        info["transformers"] = sys.modules["transformers"].__version__
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info
