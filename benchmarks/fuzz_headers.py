"""Mutation fuzzing of GGUF headers, safetensors files and config.json (tests/helpers/fuzz.py):
counts of cases tried, tracebacks, hangs, peak memory against the largest input, and agreement
with llama.cpp's loader (llama-cpp-python, vocab_only, in a worker process that may crash).

    python benchmarks/fuzz_headers.py --cases 100000 [--seed 0] [--oracle] [--out FILE]

--cases counts GGUF cases; safetensors and config.json get --json-cases each (default a tenth).
Writes benchmarks/results/fuzz_headers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

def machine() -> dict:
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":")[1].split())
                break
    model = next((line.split(":")[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {"cpu": model, "flags": {k: k in flags for k in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16")},
            "python": platform.python_version()}


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=2000, help="GGUF cases")
    ap.add_argument("--json-cases", type=int, default=None, help="safetensors and config.json cases each")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bundled-every", type=int, default=100, help="every N-th GGUF case mutates the bundled header")
    ap.add_argument("--cli-every", type=int, default=25, help="every N-th case also runs plan/inspect")
    ap.add_argument("--oracle", action="store_true", help="compare with llama.cpp on every GGUF case")
    ap.add_argument("--oracle-bundled-max", type=int, default=200, help="oracle calls on bundled-header cases")
    ap.add_argument("--limit", type=float, default=20.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "fuzz_headers.json"))
    ap.add_argument("--keep", default=None, help="folder to keep failing inputs in")
    args = ap.parse_args(argv)
    args.json_cases = args.cases // 10 if args.json_cases is None else args.json_cases
    return args


class Run:
    def __init__(self, args, fuzz, work: str):
        self.args, self.fuzz, self.work = args, fuzz, work
        self.stats = {"gguf": {}, "safetensors": {}, "config.json": {}}
        self.failures = []
        self.agree = {"llama_refuses": 0, "both_refuse": 0, "llama_accepts": 0, "both_accept": 0,
                      "duplicate_token_cases": 0, "quantkit_accepts_llama_refuses": [], "oracle_bundled": 0}
        self.largest = 0
        self.rng = random.Random(args.seed)
        self.oracle = fuzz.Oracle() if args.oracle else None

    def record(self, kind, mut, out, data):
        self.stats[kind][out.kind] = self.stats[kind].get(out.kind, 0) + 1
        self.largest = max(self.largest, len(data))
        if out.kind in ("traceback", "hang"):
            self.failures.append({"kind": kind, "mutator": mut, "outcome": out.kind, "detail": out.detail[-2000:]})
            if self.args.keep:
                os.makedirs(self.args.keep, exist_ok=True)
                with open(os.path.join(self.args.keep, f"{kind}-{len(self.failures)}"), "wb") as f:
                    f.write(data)

    def compare(self, i: int, path: str, mut: str, ok_qk: bool) -> None:
        """llama.cpp's verdict on the same file; what quantkit accepts and llama.cpp refuses is kept."""
        a = self.agree
        if self.oracle.accepts(path):
            a["llama_accepts"] += 1
            a["both_accept"] += ok_qk
            return
        a["llama_refuses"] += 1
        a["both_refuse"] += not ok_qk
        if ok_qk and self.fuzz.duplicate_tokens(path):
            a["duplicate_token_cases"] += 1
        elif ok_qk and len(a["quantkit_accepts_llama_refuses"]) < 50:
            keep = os.path.join(self.work, f"disagree-{i}.gguf")
            os.replace(path, keep)
            a["quantkit_accepts_llama_refuses"].append({"case": i, "mutator": mut, "file": keep})

    def gguf(self, tiny: str, head: str) -> None:
        args, fuzz = self.args, self.fuzz
        seed_bytes = {p: open(p, "rb").read() for p in (tiny, head)}
        layouts = {p: fuzz.gguf_layout(b) for p, b in seed_bytes.items()}
        path = os.path.join(self.work, "case.gguf")
        t0 = time.time()
        for i in range(args.cases):
            src = head if args.bundled_every and i % args.bundled_every == args.bundled_every - 1 else tiny
            mut, data = fuzz.mutate_gguf(seed_bytes[src], layouts[src], self.rng)
            with open(path, "wb") as f:
                f.write(data)
            with_cli = args.cli_every and i % args.cli_every == 0
            out = fuzz.run_case(lambda: fuzz.gguf_case(path, with_cli, load_tensors=src == tiny),
                                args.limit, trace_memory=False)
            self.record("gguf", mut, out, data)
            if self.oracle and (src == tiny or self.agree["oracle_bundled"] < args.oracle_bundled_max):
                self.agree["oracle_bundled"] += src == head
                self.compare(i, path, mut, out.kind == "ok")
            if i % 1000 == 999:
                print(f"gguf {i + 1}/{args.cases} {time.time() - t0:.0f}s {self.stats['gguf']}", flush=True)
                self.checkpoint(i + 1, t0)

    def checkpoint(self, done: int, t0: float) -> None:
        """The counts so far, in the output file, so that a run cut short still reports."""
        with open(self.args.out + ".partial", "w") as f:
            json.dump({"gguf_cases_done": done, "seconds": round(time.time() - t0, 1), "outcomes": self.stats,
                       "tracebacks": sum(x["outcome"] == "traceback" for x in self.failures),
                       "hangs": sum(x["outcome"] == "hang" for x in self.failures), "largest_input_bytes": self.largest,
                       "llama_cpp_agreement": self.agree}, f, indent=1)

    def hf(self, hf: str) -> None:
        fuzz = self.fuzz
        st_seed = open(os.path.join(hf, "model.safetensors"), "rb").read()
        cfg_seed = open(os.path.join(hf, "config.json"), "rb").read()
        case_dir = os.path.join(self.work, "hf-case")
        os.makedirs(case_dir)
        for i in range(2 * self.args.json_cases):
            kind = "safetensors" if i % 2 == 0 else "config.json"
            st, cfg = st_seed, cfg_seed
            if kind == "safetensors":
                mut, st = fuzz.mutate_safetensors(st_seed, self.rng)
            elif self.rng.random() < 0.5:
                mut, cfg = fuzz.mutate_json_bytes(cfg_seed, self.rng)
            else:
                mut, doc = fuzz.mutate_json(json.loads(cfg_seed), self.rng)
                cfg = json.dumps(doc).encode()
            with open(os.path.join(case_dir, "model.safetensors"), "wb") as f:
                f.write(st)
            with open(os.path.join(case_dir, "config.json"), "wb") as f:
                f.write(cfg)
            with_cli = self.args.cli_every and (i // 2) % self.args.cli_every == 0
            out = fuzz.run_case(lambda: fuzz.hf_case(case_dir, with_cli), self.args.limit, trace_memory=False)
            self.record(kind, mut, out, st if kind == "safetensors" else cfg)


def main(argv=None) -> int:
    args = parse_args(argv)
    from helpers import fuzz
    from quantkit.models.bundled import bundled_path

    work = tempfile.mkdtemp(prefix="fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    seeds = os.path.join(work, "seeds")
    os.makedirs(seeds)
    tiny = fuzz.tiny_gguf_seed(os.path.join(seeds, "tiny.gguf"), bundled_path())
    head = fuzz.bundled_header_seed(os.path.join(seeds, "head.gguf"), bundled_path())
    hf = fuzz.tiny_hf_seed(os.path.join(seeds, "hf"))
    fuzz.warm_up(tiny, hf)
    fuzz.warm_up(head)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    run = Run(args, fuzz, work)
    t0 = time.time()
    run.gguf(tiny, head)
    t_gguf = time.time() - t0
    run.hf(hf)
    if run.oracle:
        run.oracle.close()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {
        "command": "python benchmarks/fuzz_headers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "cases_tried": args.cases + 2 * args.json_cases, "gguf_cases": args.cases, "json_cases_each": args.json_cases,
        "outcomes": run.stats,
        "tracebacks": sum(1 for f in run.failures if f["outcome"] == "traceback"),
        "hangs": sum(1 for f in run.failures if f["outcome"] == "hang"),
        "seconds": round(time.time() - t0, 1), "gguf_seconds": round(t_gguf, 1),
        "largest_input_bytes": run.largest,
        "peak_rss_growth_bytes": peak_rss - base_rss,
        "peak_rss_growth_vs_largest_input": round((peak_rss - base_rss) / run.largest, 3),
        "failures": run.failures[:50],
    }
    if run.oracle:
        a = run.agree
        a["oracle_crashes"] = run.oracle.crashes
        a["refuse_agreement"] = round(a["both_refuse"] / max(1, a["llama_refuses"]), 5)
        a["accept_agreement"] = round(a["both_accept"] / max(1, a["llama_accepts"]), 5)
        result["llama_cpp_agreement"] = a
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "failures"}, indent=1))
    return 0 if not run.failures else 1


if __name__ == "__main__":
    sys.exit(main())
