"""What the budget adds to a GPTQ run: the sensitivity pass (Hessians, per-type errors, the
single-tensor KL probes; no cache) and the allocation, against quantkit's GPTQ of the stock
Q4_K_M mix at the same calibration, one after the other in one run, on the bundled
Gemma-3-270M's F32 GGUF. CPU seconds (this process's for the pass and the allocation, the
child's for GPTQ) are the comparable figure on a shared machine; the load average is recorded.

    python benchmarks/budget_cost.py [--nsamples 16] [--seqlen 512] [--skip-gptq]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from gguf_gptq import DATA, timed  # noqa: E402

WORK = os.path.join(os.environ.get("QUANTKIT_CACHE", os.path.expanduser("~/.cache/quantkit")), "bench-budget")
RESULTS = os.path.join(HERE, "results", "budget_cost.json")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--skip-gptq", action="store_true")
    args = ap.parse_args()
    from quantkit.models.open import open_model
    from quantkit.quant.budget import Budget, plan_mix
    from quantkit.quant.sensitivity_pass import measure_sensitivity
    f32 = os.path.join(WORK, "f32.gguf")
    valid = os.path.join(DATA, "wikitext-2", "valid.txt")
    out = {"nsamples": args.nsamples, "seqlen": args.seqlen, "loadavg_start": open("/proc/loadavg").read().split()[:3]}

    def save():
        with open(RESULTS + ".tmp", "w") as f:
            json.dump(out, f, indent=1)
        os.replace(RESULTS + ".tmp", RESULTS)

    src = open_model(f32)
    w0, c0 = time.perf_counter(), time.process_time()
    sens = measure_sensitivity(src, f32, calib=valid, nsamples=args.nsamples, seqlen=args.seqlen, cache=False,
                               show_progress=False)
    w1, c1 = time.perf_counter(), time.process_time()
    mix = plan_mix(sens, Budget("size", 241961952), src.metadata)
    w2, c2 = time.perf_counter(), time.process_time()
    out["sensitivity"] = {"wall_s": round(w1 - w0, 1), "cpu_s": round(c1 - c0, 1),
                          "probe_wall_s": round(sens.meta.get("seconds_probes", 0), 1), "n_probes": len(sens.probes)}
    out["allocation"] = {"wall_s": round(w2 - w1, 2), "cpu_s": round(c2 - c1, 2), "est_kl": mix.est_kl}
    out["loadavg_after_sensitivity"] = open("/proc/loadavg").read().split()[:3]
    print(json.dumps(out), flush=True)
    save()
    if args.skip_gptq:
        return
    gout = os.path.join(WORK, f"cost-gptq-q4_k_m-{args.nsamples}.gguf")
    out["gptq"] = timed([sys.executable, "-m", "quantkit.cli", "quantize", f32, "--format", "gguf:q4_k_m+gptq",
                         "--calib", valid, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                         "--threads", "2", "-o", gout], os.path.join(WORK, "cost-gptq.log"))
    out["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    out["ratio_cpu"] = (out["sensitivity"]["cpu_s"] + out["allocation"]["cpu_s"]) / out["gptq"]["cpu_s"]
    print(json.dumps(out), flush=True)
    save()
    os.unlink(gout)


if __name__ == "__main__":
    main()
