"""The hardware table (hardware.yaml) as typed rows, and device lookup by name.

Capacities in the YAML are GiB (memory chips come in powers of two: a "12 GB" card holds
12 GiB); bandwidths are GB/s = 1e9 bytes/s as vendors print them. Here everything becomes
bytes and bytes per second.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
from dataclasses import dataclass

import yaml

from ..util.errors import QuantkitError

GIB = 1 << 30
_TABLE = os.path.join(os.path.dirname(__file__), "hardware.yaml")


@dataclass(frozen=True)
class Device:
    name: str
    label: str
    kind: str                      # "gpu" (discrete VRAM), "apple" (unified memory), "cpu"
    memory_bytes: int              # usable by the model (Apple: RAM x usable_fraction)
    bandwidth: float               # bytes per second, peak
    tflops: float | None           # dense FP16 matrix TFLOP/s (max of fp16/fp32 where listed)
    source: str
    count: int = 1                 # GPUs of this kind in the box (layers split across them)

    @property
    def total_memory(self) -> int:
        return self.memory_bytes * self.count

    @property
    def is_gpu(self) -> bool:
        return self.kind == "gpu"

    def to_dict(self) -> dict:
        return {"name": self.name, "label": self.label, "kind": self.kind, "count": self.count,
                "memory_bytes": self.memory_bytes, "bandwidth_bytes_per_s": self.bandwidth,
                "tflops_fp16": self.tflops, "source": self.source}


@dataclass(frozen=True)
class Efficiency:
    decode_cpu: float
    decode_gpu: float
    decode_apple: float
    prompt: float
    source: str

    def decode(self, kind: str) -> float:
        return {"cpu": self.decode_cpu, "gpu": self.decode_gpu, "apple": self.decode_apple}[kind]


@functools.lru_cache(maxsize=1)
def _load() -> tuple[dict[str, Device], Efficiency, dict[str, dict]]:
    with open(_TABLE, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    devices: dict[str, Device] = {}
    rows: dict[str, dict] = {}
    for section, kind in (("gpus", "gpu"), ("apple", "apple"), ("cpus", "cpu")):
        for r in raw[section]:
            if not r.get("source"):
                raise ValueError(f"hardware.yaml: row {r.get('name')} has no source")
            tflops = max(float(r.get("tflops_fp16") or 0), float(r.get("tflops_fp32") or 0)) or None
            if kind == "gpu":
                mem = int(r["vram_gb"] * GIB)
            elif kind == "apple":
                mem = int(r["ram_gb"] * GIB * r.get("usable_fraction", 0.75))
            else:
                mem = int(r["capacity_gb"] * GIB)
            devices[r["name"]] = Device(r["name"], r["label"], kind, mem, r["bandwidth_gbs"] * 1e9,
                                        tflops, r["source"])
            rows[r["name"]] = dict(r, kind=kind)
    e = raw["efficiency"]
    eff = Efficiency(e["decode_cpu"], e["decode_gpu"], e["decode_apple"], e["prompt"], e["source"])
    return devices, eff, rows


def devices() -> dict[str, Device]:
    return _load()[0]


def rows() -> dict[str, dict]:
    """The raw YAML rows by name (for tests and `--json`)."""
    return _load()[2]


def efficiency() -> Efficiency:
    return _load()[1]


def _norm(name: str) -> str:
    s = name.strip().lower().replace("_", "-").replace(" ", "-")
    s = re.sub(r"^(nvidia|geforce|amd|radeon|tesla)-", "", s)
    s = re.sub(r"^(nvidia|geforce|amd|radeon|tesla)-", "", s)
    return s


def suggest(name: str, choices, n: int = 3) -> str:
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    if not close:
        # substring matches help with short inputs such as "3090" or "m2"
        close = [c for c in choices if name and name in c][:n]
    return ", ".join(close)


CALIBRATED_CPU = "calibrated-cpu"


def calibrated_cpu() -> Device | None:
    """The CPU whose decode speed was calibrated (plan/cpu_speed.yaml): its tokens/s come from the
    calibrated cost model (speed.CpuDecodeModel), not from bound x efficiency."""
    from .speed import cpu_model
    cm = cpu_model()
    if cm is None:
        return None
    return Device(CALIBRATED_CPU, f"{cm.machine} (calibrated)", "cpu", 32 * GIB, cm.bandwidth, None, cm.source)


def device(spec: str) -> Device:
    """A device by table name; "2x rtx-3090" or "rtx-3090*2" means two of them (layers split)."""
    s = _norm(spec)
    if s in (CALIBRATED_CPU, "this-cpu"):
        d = calibrated_cpu()
        if d is None:
            raise QuantkitError("no CPU calibration (plan/cpu_speed.yaml)",
                                hint="run benchmarks/plan_speed_calibrate.py")
        return d
    count = 1
    m = re.fullmatch(r"(\d+)\s*[x*]\s*(.+)", s) or None
    if m:
        count, s = int(m.group(1)), m.group(2).strip("-")
    else:
        m = re.fullmatch(r"(.+?)\s*[x*](\d+)", s)
        if m and m.group(1) in devices():
            s, count = m.group(1), int(m.group(2))
    table = devices()
    if s not in table:
        # tolerate "3090" -> "rtx-3090", "a100" -> only if unambiguous
        hits = [k for k in table if k.endswith("-" + s) or k == s or k.split("-", 1)[-1] == s]
        if len(hits) == 1:
            s = hits[0]
        else:
            close = suggest(s, table)
            raise QuantkitError(f"unknown device '{spec}'",
                                hint=(f"did you mean: {close}? " if close else "")
                                + "see `quantkit plan --list-devices`, or give --vram GB --bandwidth GB/s")
    if count < 1 or count > 64:
        raise QuantkitError(f"device count {count} in '{spec}' must be between 1 and 64")
    if count > 1 and table[s].kind != "gpu":
        raise QuantkitError(f"'{spec}': only discrete GPUs can be multiplied")
    d = table[s]
    if count == 1:
        return d
    return Device(d.name, f"{count}x {d.label}", d.kind, d.memory_bytes, d.bandwidth, d.tflops, d.source, count)


def custom(vram_gb: float | None, bandwidth_gbs: float | None, tflops: float | None = None,
           kind: str = "gpu") -> Device:
    """A device described on the command line (--vram / --bandwidth)."""
    if vram_gb is None or bandwidth_gbs is None:
        raise QuantkitError("--vram and --bandwidth go together", hint="e.g. --vram 12 --bandwidth 360")
    for flag, v, hi in (("--vram", vram_gb, 100_000), ("--bandwidth", bandwidth_gbs, 100_000),
                        ("--tflops", tflops, 1_000_000)):
        if v is not None and not (0 < v < hi):
            raise QuantkitError(f"{flag} {v:g} is not a plausible value", hint=f"give a number between 0 and {hi}")
    return Device("custom", f"custom {vram_gb:g} GiB @ {bandwidth_gbs:g} GB/s", kind, int(vram_gb * GIB),
                  bandwidth_gbs * 1e9, tflops, "given on the command line")


DEFAULT_DEVICES = ["rtx-3060", "rtx-4090", "a100-80gb", "apple-m2-max", "ddr5-5600-2ch"]
