"""What the budget adds to a GPTQ run: the sensitivity pass (Hessians, per-type errors, the
single-tensor KL probes; no cache), the allocation and the measured check of the mix (whole-mix
probes, no cache), against quantkit's GPTQ of a stock mix at the same calibration, on the
bundled Gemma-3-270M's F32 GGUF, at the Q4_K_S size. CPU seconds (this process's for the pass,
the allocation and the check, the child's for GPTQ) are the comparable figure on a shared
machine; the load average is recorded. The GPTQ side is run here, or (--gptq-from) taken from
budget_mix.py's results of a GPTQ run at the same calibration on the same machine.

    python benchmarks/budget_cost.py [--nsamples 16] [--seqlen 512] [--gptq-from q4_k_s/gptq]
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
    ap.add_argument("--gptq-from", default=None, help="a GPTQ run's key in budget_mix.json (same calibration)")
    ap.add_argument("--budget", type=int, default=249887712, help="bytes (default: the Q4_K_S imatrix file)")
    args = ap.parse_args()
    from budget_mix import TYPES
    from quantkit.models.open import open_model
    from quantkit.quant.budget import Budget, plan_mix
    from quantkit.quant.budget_check import MixProbe, check_mix
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
                               show_progress=False, types=TYPES.split(","))
    w1, c1 = time.perf_counter(), time.process_time()
    budget = Budget("size", args.budget)
    mix = plan_mix(sens, budget, src.metadata)
    w2, c2 = time.perf_counter(), time.process_time()
    probe = MixProbe(src, f32, sens, valid, args.seqlen)         # no cache: every whole-mix probe runs
    kept, cands = check_mix(sens, budget, src.metadata, mix, probe)
    w3, c3 = time.perf_counter(), time.process_time()
    out["check"] = {"wall_s": round(w3 - w2, 1), "cpu_s": round(c3 - c2, 1), "n_probed": probe.n_probed,
                    "candidates": [c.as_dict() for c in cands]}
    out["sensitivity"] = {"wall_s": round(w1 - w0, 1), "cpu_s": round(c1 - c0, 1),
                          "probe_wall_s": round(sens.meta.get("seconds_probes", 0), 1), "n_probes": len(sens.probes)}
    out["allocation"] = {"wall_s": round(w2 - w1, 2), "cpu_s": round(c2 - c1, 2), "est_kl": mix.est_kl}
    out["loadavg_after_sensitivity"] = open("/proc/loadavg").read().split()[:3]
    print(json.dumps(out), flush=True)
    save()
    if args.skip_gptq:
        return
    if args.gptq_from:
        from budget_mix import RESULTS as MIX
        out["gptq"] = json.load(open(MIX))["runs"][args.gptq_from]
        out["gptq"]["from"] = f"benchmarks/results/budget_mix.json runs[{args.gptq_from}]"
        out["ratio_cpu"] = (out["sensitivity"]["cpu_s"] + out["allocation"]["cpu_s"] + out["check"]["cpu_s"]) \
            / out["gptq"]["cpu_s"]
        print(json.dumps(out), flush=True)
        save()
        return
    gout = os.path.join(WORK, f"cost-gptq-q4_k_s-{args.nsamples}.gguf")
    out["gptq"] = timed([sys.executable, "-m", "quantkit.cli", "quantize", f32, "--format", "gguf:q4_k_s+gptq",
                         "--calib", valid, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                         "--threads", "2", "-o", gout], os.path.join(WORK, "cost-gptq.log"))
    out["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    out["ratio_cpu"] = (out["sensitivity"]["cpu_s"] + out["allocation"]["cpu_s"] + out["check"]["cpu_s"]) \
        / out["gptq"]["cpu_s"]
    print(json.dumps(out), flush=True)
    save()
    os.unlink(gout)


if __name__ == "__main__":
    main()
