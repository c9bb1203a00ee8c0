"""Peak RSS of reading GPTQ's spool of quantized blocks back for the GGUF writer, at the size the
44-layer Llama-2-13B-shaped run spools (44 x 7 Q4_0 linears, 7.85 GB), two ways side by side:
the memory map the spool used to serve from, and the pread into a fresh buffer per tensor it
uses now (quantkit.quant.gguf_gptq.Spool). Each way runs in a child process of its own and
reports its VmHWM. Needs ~8 GB free disk beside $QUANTKIT_CACHE/bench-scale.

    python benchmarks/spool_rss.py   # writes benchmarks/results/spool_rss.json
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WORK = os.path.join(os.environ.get("QUANTKIT_CACHE", os.path.expanduser("~/.cache/quantkit")), "bench-scale")
Q4_0 = 18 / 32                                   # bytes per weight
HIDDEN, MLP, LAYERS = 5120, 13824, 44
SIZES = [int(HIDDEN * HIDDEN * Q4_0)] * 4 + [int(HIDDEN * MLP * Q4_0)] * 3

CHILD = r"""
import json, sys, time
import numpy as np
from quantkit.quant.gguf_gptq import Spool
way, work, sizes, layers = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
spool = Spool(work, work + "/spool-bench.gguf")
try:
    chunk = np.arange(max(sizes), dtype=np.uint8)
    for l in range(layers):
        for i, n in enumerate(sizes):
            spool.put(f"blk.{l}.{i}", chunk[:n])
    del chunk
    before = hwm()
    t = time.perf_counter()
    mm = np.memmap(spool.path, dtype=np.uint8, mode="r") if way == "mmap" else None
    total = 0
    for name, (off, n) in spool.where.items():
        buf = mm[off:off + n] if mm is not None else spool.get(name)
        total += int(buf[::65521].sum())             # touch it the way the writer does: read all
        _ = bytes(buf)
        del buf
    print(json.dumps({"way": way, "spool_bytes": sum(n for _, n in spool.where.values()),
                      "hwm_before_read": before, "hwm_after_read": hwm(),
                      "read_s": round(time.perf_counter() - t, 1), "check": total}))
finally:
    spool.close()
"""


def main() -> None:
    os.makedirs(WORK, exist_ok=True)
    out = {"layers": LAYERS, "tensor_bytes": SIZES, "runs": []}
    for way in ("mmap", "pread"):
        r = subprocess.run([sys.executable, "-c", CHILD, way, WORK, json.dumps(SIZES), str(LAYERS)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(r.stderr.strip().splitlines()[-1])
        res = json.loads(r.stdout.strip().splitlines()[-1])
        print(res, flush=True)
        out["runs"].append(res)
    a, b = (x["hwm_after_read"] for x in out["runs"])
    out["ratio_pread_over_mmap"] = round(b / a, 3)
    out["date"] = time.strftime("%Y-%m-%d")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "spool_rss.json"), "w") as f:
        json.dump(out, f, indent=2)
    print("pread/mmap peak RSS:", out["ratio_pread_over_mmap"])


if __name__ == "__main__":
    main()
