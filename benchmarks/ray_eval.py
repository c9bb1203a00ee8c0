"""A ladder of 6 RTN rungs of the bundled Gemma-3-270M, quantized and scored locally and on a local
Ray runtime of 1 and 2 workers: wall time, peak RSS of the driver and of each Ray worker, the
overhead Ray adds per task, and the bytes of the reference's log-probabilities per chunk
(float32 against eval.logprob_codec).

    PYTHONPATH=src python benchmarks/ray_eval.py [--chunks 1] [--ctx 128] [--threads 1]

Each configuration runs `quantkit eval --ladder ... --json` in a fresh process with a fresh
quantkit cache (so every rung is quantized and the reference computed in each), while a sampler
reads VmHWM of the driver and of every `ray::` process it started. Writes benchmarks/results/ray_eval.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RUNGS = "q8_0,q5_1,q5_0,q4_1,q4_0,q6_k"


def vm_hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def ray_pids(root: int) -> list[int]:
    """The `ray::` worker processes descended from ROOT (the run's driver: its raylet starts
    them), not those of other Ray runs on the machine."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if not f.read().startswith(b"ray::"):
                        continue
            except OSError:
                continue
            pid = int(d)
            while pid > 1 and pid != root:
                pid = _ppid(pid)
            if pid == root:
                out.append(int(d))
    return out


def run(extra: list[str], a) -> dict:
    with tempfile.TemporaryDirectory(prefix="qk-ray-bench-") as cache:
        env = {**os.environ, "QUANTKIT_CACHE": cache, "QUANTKIT_QUIET": "1"}
        cmd = [sys.executable, "-m", "quantkit.cli", "eval", "--ladder", RUNGS, "--chunks", str(a.chunks), "--ctx",
               str(a.ctx), "--threads", str(a.threads), "--no-speed", "--json", *extra]
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        peaks: dict[int, int] = {}
        driver = [0]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                driver[0] = max(driver[0], vm_hwm(p.pid))
                for pid in ray_pids(p.pid):
                    peaks[pid] = max(peaks.get(pid, 0), vm_hwm(pid))
                time.sleep(0.2)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        out, err = p.communicate()
        wall = time.perf_counter() - t0
        stop.set()
        th.join()
        if p.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{err}")
        res = json.loads(out)
    workers = sorted(peaks.values(), reverse=True)
    return {"wall_s": wall, "driver_peak_rss_bytes": driver[0], "ray_worker_peak_rss_bytes": workers[:4],
            "rows": [{k: r.get(k) for k in ("name", "rung", "ppl", "kld_mean", "file_bytes")} for r in res["models"]],
            "ray": res["meta"].get("ray")}


def ray_start_s(workers: int) -> float:
    code = ("import time, ray; t = time.perf_counter(); ray.init(num_cpus=%d, include_dashboard=False, "
            "log_to_driver=False); ray.get(ray.remote(lambda: 1).remote()); print(time.perf_counter() - t); "
            "ray.shutdown()" % workers)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return float(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    from quantkit.util.machine import machine_info
    out = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "rungs": RUNGS,
           "machine": machine_info(a.threads), "load_avg_start": os.getloadavg()}
    out["local"] = run([], a)
    out["ray_1_worker"] = run(["--ray", "--workers", "1"], a)
    out["ray_2_workers"] = run(["--ray", "--workers", "2"], a)
    out["ray_start_s"] = {"1": ray_start_s(1), "2": ray_start_s(2)}
    n_tasks = 1 + len(RUNGS.split(","))   # the reference and one cell per rung
    out["ray_overhead_per_task_s"] = ((out["ray_1_worker"]["wall_s"] - out["ray_start_s"]["1"]
                                       - out["local"]["wall_s"]) / n_tasks)
    out["speedup_2_vs_1"] = out["ray_1_worker"]["wall_s"] / out["ray_2_workers"]["wall_s"]
    n_rows, vocab = a.ctx - 1 - a.ctx // 2, 262144
    import numpy as np
    from quantkit.eval import logprob_codec as codec
    lp = np.full((n_rows, vocab), -20.0, dtype=np.float32)
    enc = codec.encode(lp, np.zeros(n_rows, dtype=np.int64))
    out["reference_bytes_per_chunk"] = {"float32": lp.nbytes, "codec": codec.nbytes(enc),
                                        "llama_perplexity_kl_base": n_rows * (vocab * 2 + 8)}
    out["load_avg_end"] = os.getloadavg()
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", "ray_eval.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps({k: v for k, v in out.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
