"""Check `quantkit plan --runtime torch --format fp32` peak RSS against the torch runtime.

The workload is quantkit eval's reference pass (src/quantkit/runtimes/torch.py): load the
bundled Gemma-3-270M GGUF into transformers in float32 (TorchCausalLM(from_gguf=True)), then one
forward pass over n_ctx tokens keeping the logits of the second half (scored_logits(tokens,
n_ctx // 2), as `quantkit eval` scores a chunk). Each sequence length runs in a fresh process;
peak RSS is resource.getrusage(RUSAGE_SELF).ru_maxrss.

Besides the peak, each child records the parts the plan models (memory.torch_cpu_parts):
- the process base: RSS after importing torch, transformers, quantkit's runtime and the
  transformers modules building the model imports (transformers loads them lazily), the
  planner's TORCH_CPU_BASE; and the RSS of torch + transformers alone, for reference;
- RSS, RssFile and glibc's mallinfo2() (heap, free heap, mmap'd bytes) just before and after
  load_state_dict (the load peak: file pages + state dict + parameters), after loading, and after
  the forward pass.
The wrapper around load_state_dict only reads /proc and mallinfo2; it does not change the run.

    PYTHONPATH=src .venv/bin/python benchmarks/plan_torch_rss.py            # measure (one child at a time)
    PYTHONPATH=src .venv/bin/python benchmarks/plan_torch_rss.py --replan   # recompute the plan column only
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "src"))
OUT = os.path.join(HERE, "results", "plan_torch_rss.json")
LENGTHS = (512, 2048, 3072, 4096)   # 512 and 2048: the load phase peaks; 3072, 4096: the forward (kept logits)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(k, ctypes.c_size_t) for k in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


def _state() -> dict:
    d = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile"):
                d[k] = int(v.split()[0]) * 1024
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        mi = libc.mallinfo2()
        d.update(heap=mi.arena, heap_free=mi.fordblks, heap_in_use=mi.uordblks, mmapped=mi.hblkhd)
    except (OSError, AttributeError):
        pass
    d["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return d


def child(n_ctx: int) -> None:
    import torch
    import transformers  # noqa: F401

    from quantkit.runtimes.torch import TorchCausalLM
    from quantkit.models.bundled import bundled_path
    out = {"import_torch_transformers": _state()}
    # what building the model imports (transformers' lazy modules): part of the process base
    import transformers.masking_utils  # noqa: F401
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig  # noqa: F401
    out["base"] = _state()
    if n_ctx:
        orig = torch.nn.Module.load_state_dict

        def wrapped(self, *a, **k):
            out["before_load_state_dict"] = _state()
            r = orig(self, *a, **k)
            out["after_load_state_dict"] = _state()
            return r

        torch.nn.Module.load_state_dict = wrapped
        rt = TorchCausalLM(bundled_path(), n_threads=2, from_gguf=True)
        torch.nn.Module.load_state_dict = orig
        out["after_load"] = _state()
        tokens = [2] + [(7 * i + 3) % 200000 + 100 for i in range(n_ctx - 1)]
        logits = rt.scored_logits(tokens, n_ctx // 2)
        out["logits_shape"] = list(logits.shape)
        out["after_forward"] = _state()
    print("RESULT " + json.dumps(out), flush=True)


def run(n_ctx: int) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", str(n_ctx)], capture_output=True, text=True,
                       timeout=1800, env=dict(os.environ, PYTHONPATH=os.path.join(REPO, "src")))
    res = next((json.loads(l[7:]) for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
    if res is None:
        raise RuntimeError(p.stderr[-2000:])
    return res


def planned(n: int) -> dict:
    from quantkit.models.bundled import bundled_path
    from quantkit.plan import formats, memory
    from quantkit.plan.model import load
    from quantkit.plan.planner import PlanOptions, plan
    p = plan(bundled_path(), PlanOptions(runtime="torch", formats=["fp32"], n_ctx=n, devices=["ddr4-3200-2ch"]))
    m = load(bundled_path())
    parts = memory.torch_cpu_parts(m, formats.tensor_bytes(m, "fp32"), n, True)
    assert parts["peak"] == p.rows[0].cpu_resident
    return {"planned_peak_rss": p.rows[0].cpu_resident, "planned_load": parts["load"],
            "planned_forward": parts["forward"], "planned_forward_stage": parts["forward_stage"],
            "planned_stages": memory.torch_cpu_forward(m, n)}


def replan(res: dict) -> dict:
    for c in res["cases"]:
        c.update(planned(c["n_ctx"]))
        c["error"] = (c["planned_peak_rss"] - c["measured_peak_rss"]) / c["measured_peak_rss"]
    return res


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(int(sys.argv[2]))
        return
    if "--replan" in sys.argv:
        with open(OUT) as f:
            res = replan(json.load(f))
    else:
        uptime = lambda: subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()  # noqa: E731
        before = uptime()
        b = run(0)
        cases = []
        for n in LENGTHS:
            r = run(n)
            cases.append({"n_ctx": n, "scored_positions": n - n // 2, "measured_peak_rss": r["after_forward"]["maxrss"],
                          "measured_load_peak": r["after_load"]["maxrss"], "stages": r})
            print(n, r["after_forward"]["maxrss"], flush=True)
        res = replan({"measured_import_base": b["base"]["VmRSS"],
                      "measured_import_torch_transformers": b["import_torch_transformers"]["VmRSS"],
                      "cases": cases, "uptime_before": before, "uptime": uptime()})
    for c in res["cases"]:
        print(c["n_ctx"], c["planned_peak_rss"], c["measured_peak_rss"], f"{100 * c['error']:+.1f}%")
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
