"""Whole-model GGUF export of the bundled Gemma-3-270M: quantkit vs llama.cpp's quantizer vs
gguf-py's numpy quantizer, side by side in one run, each in its own process (peak RSS).

    .venv/bin/python benchmarks/export_speed.py [--types q4_0,q8_0] [--repeats 3]

Input: the bundled Q4_K_M model dequantized to an F32 GGUF by llama.cpp (the common F32 input).
Writes benchmarks/results/export_speed.json and prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

CHILD = r'''
import json, os, resource, sys, time
sys.path.insert(0, {tests!r})
os.environ["QUANTKIT_QUIET"] = "1"
which, src, out, ft = sys.argv[1:5]
t0 = time.perf_counter()
if which == "quantkit":
    # Imports (torch alone takes ~2 s) are start-up, not quantization: done before the clock.
    from quantkit import api
    import quantkit.quant.gguf_export, quantkit.models.open  # noqa: E401,F401
    t0 = time.perf_counter()
    api.quantize(src, out, format="gguf:" + ft, show_progress=False)
elif which == "llama.cpp":
    from helpers.ggml_reference import llama_quantize
    t0 = time.perf_counter()
    llama_quantize(src, out, ft, nthread=os.cpu_count())
elif which == "gguf-py":
    # gguf-py's numpy quantizer on the same tensors llama.cpp quantizes (tensor data only).
    import numpy as np
    from gguf import GGUFReader, GGMLQuantizationType
    from gguf.quants import quantize
    from quantkit.quant.gguf_export import export_gguf  # noqa: F401  (same import cost as quantkit)
    from quantkit.models.gguf import GGUFSource
    from quantkit.quant.gguf_policy import TypePolicy, ModelFacts, tensor_order
    s = GGUFSource(src)
    names = tensor_order([t.name for t in s.tensors()])
    sp = s.spec
    pol = TypePolicy(ft, names, ModelFacts(sp.arch, sp.n_layer, sp.n_head, sp.n_head_kv))
    t0 = time.perf_counter()
    with open(out, "wb") as f:
        for n in names:
            info = s.tensor_info(n)
            target = pol.choose(n, info.shape, info.type)
            x = np.asarray(s.raw(n)[0]).view(np.float32).reshape(info.shape)
            q = x if target == "f32" else quantize(x, GGMLQuantizationType[target.upper()])
            f.write(np.ascontiguousarray(q).tobytes())
dt = time.perf_counter() - t0
# VmHWM: this process's own peak (ru_maxrss would carry the parent's peak across fork+exec).
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({{"seconds": dt, "peak_rss_mb": int(hwm) / 1024}}))
'''


def run(which, src, out, ft):
    code = CHILD.format(tests=os.path.join(HERE, "..", "tests"))
    r = subprocess.run([sys.executable, "-c", code, which, src, out, ft], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{which} {ft} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default="q4_0,q8_0")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from helpers.ggml_reference import llama_quantize
    from quantkit.models.bundled import bundled_path
    from quantkit.models.gguf import GGUFSource
    tmp = tempfile.mkdtemp(prefix="qk-bench-")
    src = os.path.join(tmp, "f32.gguf")
    llama_quantize(bundled_path(), src, "f32")
    largest = max(t.nbytes for t in GGUFSource(src).tensors())
    rows = []
    for ft in args.types.split(","):
        res = {}
        for which in ("quantkit", "llama.cpp", "gguf-py"):
            runs = [run(which, src, os.path.join(tmp, f"{which}-{ft}.gguf"), ft) for _ in range(args.repeats)]
            res[which] = {"seconds": statistics.median(r["seconds"] for r in runs),
                          "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}
            print(ft, which, res[which], file=sys.stderr)
        same = open(os.path.join(tmp, f"quantkit-{ft}.gguf"), "rb").read() == \
            open(os.path.join(tmp, f"llama.cpp-{ft}.gguf"), "rb").read()
        rows.append({"type": ft, **{k: v for k, v in res.items()}, "identical_to_llama_cpp": same})
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"
    out = {"machine": machine, "input": "Gemma-3-270M F32 GGUF (llama.cpp dequantization of the bundled Q4_K_M)",
           "largest_tensor_f32_mb": largest / 1e6, "repeats": args.repeats, "rows": rows}
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "export_speed.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(f"| type | quantkit s | llama.cpp s | gguf-py s | quantkit / llama.cpp | quantkit / gguf-py | "
          f"quantkit peak RSS MB | llama.cpp peak RSS MB | file identical |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        q, l, g = r["quantkit"], r["llama.cpp"], r["gguf-py"]
        print(f"| {r['type']} | {q['seconds']:.2f} | {l['seconds']:.2f} | {g['seconds']:.2f} | "
              f"{q['seconds'] / l['seconds']:.2f}x | {q['seconds'] / g['seconds']:.2f}x | {q['peak_rss_mb']:.0f} | "
              f"{l['peak_rss_mb']:.0f} | {r['identical_to_llama_cpp']} |")
    print(f"\nlargest tensor in F32: {largest / 1e6:.0f} MB; machine: {machine}")
    print("times exclude Python imports for quantkit and gguf-py (torch: ~2 s) and the library load for llama.cpp")


if __name__ == "__main__":
    main()
