"""Which int8 path is fastest for all-MiniLM-L6-v2 at batch 32 on this CPU, and what bounds it.

    HF_HUB_OFFLINE=1 PYTHONPATH=src python benchmarks/encoders_int8_paths.py [--threads 1,2] [--cos 300]

1. Profile of the fp32 forward (64 WikiText-2 sentences, batch 32, padded to 75 tokens): the
   share of the linear layers (GEMM + bias) against attention, GELU, LayerNorm and the rest, and
   the Amdahl bound that share puts on any int8-linear-only speedup.
2. Per layer shape (2,400 rows, MiniLM's 384->384, 384->1536, 1536->384), ms per call: fp32
   F.linear; fbgemm `quantized::linear_dynamic` per tensor (bias fused) and quantkit's per-row
   blocks around it; oneDNN `onednn::qlinear_pointwise` per tensor (torch's dynamic quantizer +
   kernel, bias fused; + GELU fused) and per row (quantize_per_channel along rows);
   `torch._int_mm` (int8 x int8 -> int32, timed on 256 rows and scaled). Also the LSTM LM's
   recurrent projection (650 -> 2600) at 1, 10 and 350 rows.
3. The whole model with each path, timed in alternation with fp32, plus the mean cosine of its
   embeddings to fp32 on --cos sentences (the issue's fidelity target is >= 0.99).
Time: 3-6 minutes on the shared 2-core box. Writes benchmarks/results/encoders_int8_paths.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoders_common import (environment, latency_interleaved, median_seconds, wikitext_sentences,  # noqa: E402
                             write_json)

from quantkit.api import load_encoder  # noqa: E402
from quantkit.quant import int8_kernels as K  # noqa: E402
from quantkit.quant.dynamic import DynamicInt8Config, Int8DynamicLinear, quantize_encoder_  # noqa: E402

warnings.simplefilter("ignore")      # qint8 tensor creation is deprecated in 2.13; the kernels are not
LINEARS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")


def ms(fn, runs: int = 7) -> float:
    """Median milliseconds per call after two warm-up calls."""
    return 1e3 * median_seconds(fn, runs, warmup=2)


def profile_shares(enc, batches) -> dict:
    from torch.profiler import ProfilerActivity, profile
    with torch.inference_mode():
        for b in batches:
            enc(b)
        with profile(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(2):
                for b in batches:
                    enc(b)
    ev = {e.key: e for e in p.key_averages()}
    total = sum(e.self_cpu_time_total for e in ev.values())

    def tot(key):
        return ev[key].cpu_time_total if key in ev else 0.0
    shares = {"linear (GEMM + bias)": tot("aten::linear"),
              "attention (SDPA)": tot("aten::_scaled_dot_product_flash_attention_for_cpu"),
              "GELU": tot("aten::gelu"), "LayerNorm": tot("aten::layer_norm")}
    shares["other (residual adds, masks, embeddings, pooling)"] = total - sum(shares.values())
    return {k: v / total for k, v in shares.items()}


def shape_table(rows: int) -> list[dict]:
    out = []
    for k, n in ((384, 384), (384, 1536), (1536, 384)):
        torch.manual_seed(0)
        x, w, b = torch.randn(rows, k), torch.randn(n, k) * 0.05, torch.randn(n)
        wq, s = K.quantize_weight_per_channel(w)
        pk, pkb, po = K.pack_fbgemm(wq, s), K.pack_fbgemm(wq, s, b), K.pack_onednn(wq)
        xi, wt = torch.randint(-100, 100, (256, k), dtype=torch.int8), wq.t()
        r = {"shape": f"{rows}x{k} @ {k}x{n}",
             "fp32": ms(lambda: nn.functional.linear(x, w, b)),
             "fp32+gelu": ms(lambda: nn.functional.gelu(nn.functional.linear(x, w, b))),
             "fbgemm_tensor": ms(lambda: torch.ops.quantized.linear_dynamic(x, pkb, True)),
             "fbgemm_row": ms(lambda: K.linear_fbgemm(x, pk, b, True)),
             "onednn_tensor": ms(lambda: K.linear_onednn(x, po, s, b, False)),
             "onednn_tensor+gelu": ms(lambda: K.linear_onednn(x, po, s, b, False, "gelu")),
             "onednn_row": ms(lambda: K.linear_onednn(x, po, s, b, True)),
             "int_mm (scaled from 256 rows)": ms(lambda: torch._int_mm(xi, wt), 3) * rows / 256}
        out.append(r)
        print({a: (round(v, 2) if isinstance(v, float) else v) for a, v in r.items()}, flush=True)
    return out


def lstm_step_table() -> list[dict]:
    """The word LM's recurrent projection (650 -> 2600) at LSTM-step row counts, ms per call."""
    out = []
    for rows in (1, 10, 350):
        torch.manual_seed(0)
        x, w = torch.randn(rows, 650).tanh(), torch.randn(2600, 650) * 0.05
        wq, s = K.quantize_weight_per_channel(w)
        pk, po = K.pack_fbgemm(wq, s), K.pack_onednn(wq)
        r = {"rows": rows, "fp32": ms(lambda: nn.functional.linear(x, w), 50),
             "fbgemm_tensor": ms(lambda: K.linear_fbgemm(x, pk, None, False), 50),
             "onednn_tensor": ms(lambda: K.linear_onednn(x, po, s, None, False), 50),
             "fbgemm_row": ms(lambda: K.linear_fbgemm(x, pk, None, True), 50)}
        out.append(r)
        print("lstm step", {a: round(v, 3) for a, v in r.items()}, flush=True)
    return out


def variant(fp, kernel_of, row_layers, fuse_gelu=False):
    """MiniLM with int8 linears; kernel_of(per_row) picks the kernel, row_layers the per-row ones."""
    q = quantize_encoder_(copy.deepcopy(fp), DynamicInt8Config(kernel="reference"))
    for name, m in q.named_modules():
        if isinstance(m, Int8DynamicLinear):
            m.per_row = any(name.endswith(r) for r in row_layers)
            m.kernel = kernel_of(m.per_row)
            m._packed = None
    if fuse_gelu:
        for layer in q.bert.encoder.layer:
            layer.intermediate.dense.post_op = "gelu"
            layer.intermediate.intermediate_act_fn = nn.Identity()
    return q


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--cos", type=int, default=300)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    torch.set_num_threads(threads[0])
    t0 = time.time()
    res: dict = {"environment": environment(), "uptime_load_start": os.getloadavg()}
    fp = load_encoder()
    sents = wikitext_sentences(max(args.cos, 64))
    batches = [fp.tokenize(sents[i:i + 32]) for i in (0, 32)]
    rows = int(batches[0]["input_ids"].numel())
    res["rows_per_batch"] = rows
    res["fp32_profile_share"] = shares = profile_shares(fp, batches)
    print("fp32 time shares", {k: round(v, 3) for k, v in shares.items()}, flush=True)
    res["shapes_ms"] = table = shape_table(rows)
    res["lstm_step_ms"] = lstm_step_table()
    # Amdahl: the linear share sped up by the best per-shape ratio of a path, the rest unchanged
    # (calls per BERT layer: Q, K, V and attention-out are 384 -> 384, one each of the FFN shapes)
    lin = shares["linear (GEMM + bias)"]
    calls = (4, 1, 1)
    fp_sum = sum(c * r["fp32"] for c, r in zip(calls, table))
    res["amdahl_bound"] = {}
    for path in ("fbgemm_tensor", "fbgemm_row", "onednn_tensor", "onednn_row"):
        s = fp_sum / sum(c * r[path] for c, r in zip(calls, table))
        res["amdahl_bound"][path] = {"linear_speedup": s, "model_bound": 1 / ((1 - lin) + lin / s)}
    res["amdahl_bound"]["infinitely fast linears"] = {"model_bound": 1 / (1 - lin)}
    print("amdahl", res["amdahl_bound"], flush=True)
    ffn = ("intermediate.dense", "output.dense")
    models = {"fp32": fp,
              "fbgemm per row (default)": variant(fp, lambda r: "fbgemm", LINEARS),
              "onednn per row": variant(fp, lambda r: "onednn", LINEARS),
              "FFN per row fbgemm, Q/K/V/attn-out per tensor onednn": variant(
                  fp, lambda r: "fbgemm" if r else "onednn", ffn),
              "all per tensor onednn + fused GELU": variant(fp, lambda r: "onednn", (), True)}
    ref = fp.encode(sents[:args.cos])
    res["cosine"] = {}
    for name, m in models.items():
        if name != "fp32":
            c = (ref * m.encode(sents[:args.cos])).sum(1)
            res["cosine"][name] = {"mean": float(c.mean()), "min": float(c.min())}
            print(name, res["cosine"][name], flush=True)
    res["latency"] = []
    for nt in threads:
        torch.set_num_threads(nt)
        load0 = os.getloadavg()[0]
        lat = latency_interleaved(models, sents[:64], 32, args.runs)
        row = {"threads": nt, "load_avg_1m": [load0, os.getloadavg()[0]],
               "ms_per_sentence": lat, "speedup": {k: lat["fp32"] / v for k, v in lat.items()}}
        res["latency"].append(row)
        print(row, flush=True)
    res["seconds"] = round(time.time() - t0, 1)
    print(write_json("encoders_int8_paths", res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
