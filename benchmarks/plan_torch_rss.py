"""Check `quantkit plan --runtime torch --format fp32` peak RSS against the torch runtime.

The workload is quantkit eval's reference pass (src/quantkit/eval/torch_runtime.py): load the
bundled Gemma-3-270M GGUF into transformers in float32 (TorchCausalLM(from_gguf=True)), then one
forward pass over n_ctx tokens keeping the logits of the second half (scored_logits(tokens,
n_ctx // 2), as `quantkit eval` scores a chunk). Each sequence length runs in a fresh process;
peak RSS is resource.getrusage(RUSAGE_SELF).ru_maxrss. A first process only imports the runtime
(torch, transformers, quantkit) and reports its RSS: the planner's TORCH_CPU_BASE constant.

    PYTHONPATH=src .venv/bin/python benchmarks/plan_torch_rss.py
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "src"))
OUT = os.path.join(HERE, "results", "plan_torch_rss.json")
LENGTHS = (512, 4096)


def child(n_ctx: int) -> None:
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from quantkit.eval.torch_runtime import TorchCausalLM
    from quantkit.models.bundled import bundled_path
    out = {"base_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if n_ctx:
        rt = TorchCausalLM(bundled_path(), n_threads=2, from_gguf=True)
        out["after_load_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        tokens = [2] + [(7 * i + 3) % 200000 + 100 for i in range(n_ctx - 1)]
        logits = rt.scored_logits(tokens, n_ctx // 2)
        out["logits_shape"] = list(logits.shape)
        out["peak_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(out), flush=True)


def run(n_ctx: int) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", str(n_ctx)], capture_output=True, text=True,
                       timeout=1800, env=dict(os.environ, PYTHONPATH=os.path.join(REPO, "src")))
    res = next((json.loads(l[7:]) for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
    if res is None:
        raise RuntimeError(p.stderr[-2000:])
    return res


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(int(sys.argv[2]))
        return
    from quantkit.models.bundled import bundled_path
    from quantkit.plan.planner import PlanOptions, plan
    base = run(0)["base_maxrss"]
    cases = []
    for n in LENGTHS:
        r = run(n)
        p = plan(bundled_path(), PlanOptions(runtime="torch", formats=["fp32"], n_ctx=n, devices=["ddr4-3200-2ch"]))
        planned = p.rows[0].cpu_resident
        cases.append({"n_ctx": n, "scored_positions": n - n // 2, "planned_peak_rss": planned,
                      "measured_peak_rss": r["peak_maxrss"], "measured_after_load": r["after_load_maxrss"],
                      "error": (planned - r["peak_maxrss"]) / r["peak_maxrss"]})
        print(json.dumps(cases[-1]), flush=True)
    res = {"measured_import_base": base, "cases": cases,
           "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
