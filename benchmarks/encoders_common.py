"""Shared helpers of the encoder benchmarks (data paths, sentences, timing)."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / "src" / "quantkit" / "data"   # WikiText-2 and SST-2, shipped with the package
RESULTS = ROOT / "benchmarks" / "results"


def wikitext_sentences(n: int, split: str = "test", min_words: int = 5, max_words: int = 64) -> list[str]:
    """Sentences of WikiText-2 (paragraphs cut at ' . '), headings skipped, first n."""
    out = []
    with open(SHARED / "wikitext-2" / f"{split}.txt", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("="):
                continue
            for s in line.split(" . "):
                w = s.split()
                if len(w) >= min_words:
                    out.append(" ".join(w[:max_words]) + " .")
                    if len(out) == n:
                        return out
    return out


def median_seconds(fn, runs: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.inference_mode()
def latency_per_sentence(enc, sentences: list[str], batch_size: int, runs: int = 5) -> float:
    """Median seconds per sentence of the model forward (tokenization excluded) at a batch size."""
    enc.eval()
    batches = [enc.tokenize(sentences[i:i + batch_size]) for i in range(0, len(sentences), batch_size)]

    def go():
        for b in batches:
            enc(b)
    return median_seconds(go, runs) / len(sentences)


@torch.inference_mode()
def latency_interleaved(models: dict, sentences: list[str], batch_size: int, runs: int = 5) -> dict:
    """Median ms per sentence of each model's forward (tokenization excluded) at a batch size.

    The models take turns inside every run (A B A B ...), so a burst of load from another
    process hits all of them alike instead of whichever happened to be timed then."""
    batches = {}
    for name, enc in models.items():
        enc.eval()
        batches[name] = [enc.tokenize(sentences[i:i + batch_size]) for i in range(0, len(sentences), batch_size)]
        for b in batches[name][:2]:
            enc(b)
    times: dict = {name: [] for name in models}
    for _ in range(runs):
        for name, enc in models.items():
            t = time.perf_counter()
            for b in batches[name]:
                enc(b)
            times[name].append(time.perf_counter() - t)
    return {name: 1e3 * statistics.median(ts) / len(sentences) for name, ts in times.items()}


def write_json(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    p = RESULTS / f"{name}.json"
    tmp = p.with_suffix(".json.partial")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, p)
    return p


def environment() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0]}
