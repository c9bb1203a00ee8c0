"""Time to open the bundled GGUF with the strict reader (models/gguf_file.py plus the checked
hyper-parameters of models/gguf_hparams.py) against the reader before the strict checks, taken
from git at --baseline (default: the commit before them), interleaved in one process so that
load on a shared machine falls on both alike.

    python benchmarks/gguf_open_speed.py [--runs 40] [--baseline COMMIT]

Writes benchmarks/results/gguf_open_speed.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--baseline", default="177fac2")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "gguf_open_speed.json"))
    args = ap.parse_args(argv)
    from quantkit.models import gguf_file as strict
    from quantkit.models.bundled import bundled_path
    from quantkit.models.gguf_hparams import read_hparams

    old_src = subprocess.run(["git", "show", f"{args.baseline}:src/quantkit/models/gguf_file.py"],
                             cwd=os.path.dirname(HERE), capture_output=True, text=True, check=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(old_src)
    spec = importlib.util.spec_from_file_location("baseline_gguf_file", f.name)
    old = importlib.util.module_from_spec(spec)
    sys.modules["baseline_gguf_file"] = old
    spec.loader.exec_module(old)
    os.unlink(f.name)

    path = bundled_path()
    t_old, t_new = [], []
    for _ in range(args.runs):
        t = time.perf_counter()
        old.GGUFFile(path).close()
        t_old.append(time.perf_counter() - t)
        t = time.perf_counter()
        g = strict.GGUFFile(path)
        read_hparams(g.fields, {x.name: x.shape for x in g.tensors}, path)
        g.close()
        t_new.append(time.perf_counter() - t)
    res = {"file": os.path.basename(path), "runs": args.runs, "baseline": args.baseline,
           "baseline_median_s": round(statistics.median(t_old), 4), "baseline_min_s": round(min(t_old), 4),
           "strict_median_s": round(statistics.median(t_new), 4), "strict_min_s": round(min(t_new), 4),
           "ratio_median": round(statistics.median(t_new) / statistics.median(t_old), 3),
           "ratio_min": round(min(t_new) / min(t_old), 3), "load_average": os.getloadavg()[0]}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
