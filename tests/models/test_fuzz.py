"""A fast, seeded slice of the mutation fuzzer (tests/helpers/fuzz.py; the long run is
benchmarks/fuzz_headers.py): mutated GGUF headers (a tiny model with the bundled model's
metadata, and the bundled model's own 6.5 MB header), a tiny model's safetensors file and its
config.json, each opened by quantkit's real readers and CLI (plan, inspect). Every case ends in
a valid result or one clean error line: never a traceback, a hang, or an allocation far past
the input's size. On the GGUF cases llama.cpp's loader is the oracle: every file it refuses,
quantkit refuses."""

import json
import os
import random
import tracemalloc

import pytest

from helpers import fuzz

LIMIT_S = 20.0


@pytest.fixture(scope="module")
def seeds(tmp_path_factory, bundled_gguf):
    d = tmp_path_factory.mktemp("fuzz-seeds")
    tiny = fuzz.tiny_gguf_seed(str(d / "tiny.gguf"), bundled_gguf)
    head = fuzz.bundled_header_seed(str(d / "head.gguf"), bundled_gguf)
    hf = fuzz.tiny_hf_seed(str(d / "hf"))
    fuzz.warm_up(tiny, hf)
    fuzz.warm_up(head)
    return {"tiny": tiny, "head": head, "hf": hf}


def _check(out: fuzz.Outcome, what: str):
    assert out.kind in ("ok", "refused"), f"{what}: {out.kind}\n{out.detail}"
    if out.kind == "refused":
        assert "\n" not in out.detail and len(out.detail) < 1000, out.detail


def test_the_seeds_are_valid_for_quantkit_and_llama_cpp(seeds):
    oracle = fuzz.Oracle()
    try:
        for s in ("tiny", "head"):
            assert fuzz.run_case(lambda: fuzz.gguf_case(seeds[s], True), LIMIT_S, False).kind == "ok"
            assert oracle.accepts(seeds[s])
    finally:
        oracle.close()
    assert fuzz.run_case(lambda: fuzz.hf_case(seeds["hf"], True), LIMIT_S, False).kind == "ok"


def test_gguf_mutants_end_cleanly_and_agree_with_llama_cpp(seeds, tmp_path):
    rng = random.Random(20)
    data = open(seeds["tiny"], "rb").read()
    lay = fuzz.gguf_layout(data)
    oracle = fuzz.Oracle()
    path = str(tmp_path / "case.gguf")
    counts = {"ok": 0, "refused": 0}
    missed = []
    try:
        for i in range(200):
            mut, b = fuzz.mutate_gguf(data, lay, rng)
            with open(path, "wb") as f:
                f.write(b)
            out = fuzz.run_case(lambda: fuzz.gguf_case(path, i % 10 == 0), LIMIT_S, trace_memory=False)
            _check(out, f"case {i} ({mut})")
            counts[out.kind] += 1
            if not oracle.accepts(path) and out.kind == "ok" and not fuzz.duplicate_tokens(path):
                missed.append((i, mut))
    finally:
        oracle.close()
    assert counts["ok"] > 15 and counts["refused"] > 100, counts      # the mutants reach both outcomes
    assert not missed, f"llama.cpp refuses, quantkit accepts: {missed}"


def test_bundled_header_mutants_end_cleanly(seeds, tmp_path):
    rng = random.Random(21)
    data = open(seeds["head"], "rb").read()
    lay = fuzz.gguf_layout(data)
    path = str(tmp_path / "case.gguf")
    for i in range(8):
        mut, b = fuzz.mutate_gguf(data, lay, rng)
        with open(path, "wb") as f:
            f.write(b)
        _check(fuzz.run_case(lambda: fuzz.gguf_case(path, i % 4 == 0, load_tensors=False), LIMIT_S, False),
               f"case {i} ({mut})")


def test_no_case_allocates_far_past_its_input(seeds, tmp_path):
    """Hostile counts and lengths are checked before anything is allocated: the traced peak of
    a case stays under twice the input's size plus the readers' fixed overhead."""
    rng = random.Random(22)
    data = open(seeds["tiny"], "rb").read()
    lay = fuzz.gguf_layout(data)
    path = str(tmp_path / "case.gguf")
    tracemalloc.start()
    try:
        for i in range(25):
            kind = "extreme" if i % 2 else None
            mut, b = fuzz.mutate_gguf(data, lay, rng)
            if kind:          # integer fields at their extremes are where allocations would blow up
                while mut != "extreme":
                    mut, b = fuzz.mutate_gguf(data, lay, rng)
            with open(path, "wb") as f:
                f.write(b)
            out = fuzz.run_case(lambda: fuzz.gguf_case(path, False), LIMIT_S, trace_memory=True)
            _check(out, f"case {i} ({mut})")
            assert out.peak_bytes < 2 * len(b) + (8 << 20), (i, mut, out.peak_bytes, len(b))
    finally:
        tracemalloc.stop()


def _hf_cases(seeds, tmp_path, n, kind, seed):
    rng = random.Random(seed)
    st_seed = open(os.path.join(seeds["hf"], "model.safetensors"), "rb").read()
    cfg_seed = open(os.path.join(seeds["hf"], "config.json"), "rb").read()
    d = tmp_path / "case"
    d.mkdir()
    for i in range(n):
        st, cfg = st_seed, cfg_seed
        if kind == "safetensors":
            mut, st = fuzz.mutate_safetensors(st_seed, rng)
        elif i % 2:
            mut, cfg = fuzz.mutate_json_bytes(cfg_seed, rng)
        else:
            mut, doc = fuzz.mutate_json(json.loads(cfg_seed), rng)
            cfg = json.dumps(doc).encode()
        (d / "model.safetensors").write_bytes(st)
        (d / "config.json").write_bytes(cfg)
        _check(fuzz.run_case(lambda: fuzz.hf_case(str(d), i % 10 == 0), LIMIT_S, False), f"{kind} case {i} ({mut})")


def test_safetensors_mutants_end_cleanly(seeds, tmp_path):
    _hf_cases(seeds, tmp_path, 150, "safetensors", 23)


def test_config_json_mutants_end_cleanly(seeds, tmp_path):
    _hf_cases(seeds, tmp_path, 150, "config.json", 24)
