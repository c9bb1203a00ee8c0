"""A mutation fuzzer over real model files: seeds (a tiny GGUF with the bundled model's
metadata, the bundled model's own header, a tiny model's safetensors file and config.json),
mutators (bit flips, truncation, splicing, integer fields set to extremes, tensor-info and
key/value records duplicated or removed, JSON values swapped for hostile ones) and a runner
that opens each mutated file with quantkit's real readers and CLI and classifies the outcome:
"ok" (a valid result), "refused" (one clean QuantkitError line), "traceback" (any other
exception, or an error that is not one line) or "hang" (past the per-case time limit)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
import traceback
import tracemalloc
from dataclasses import dataclass

EXTREMES = (0, 1, -1, (1 << 31) - 1, 1 << 31, 1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1)
_INT_WIDTHS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 7: 1, 10: 8, 11: 8}   # GGUF value type -> bytes
_WIDTHS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


# ---------------------------------------------------------------- GGUF layout

@dataclass
class GGUFLayout:
    ints: list[tuple[int, int]]            # (offset, width) of every integer field worth mutating
    kv_records: list[tuple[int, int]]      # [start, end) of each key/value record
    tensor_records: list[tuple[int, int]]  # [start, end) of each tensor-info record
    header_end: int                        # end of the tensor infos


def gguf_layout(data: bytes) -> GGUFLayout:
    """Where the fields of a valid GGUF lie (a seed, not a mutant)."""
    q = struct.Struct("<Q").unpack_from
    i32 = struct.Struct("<I").unpack_from
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    ints, kvs, tis = [(4, 4), (8, 8), (16, 8)], [], []
    pos = 24
    for _ in range(n_kv):
        start = pos
        ints.append((pos, 8))
        pos += 8 + q(data, pos)[0]
        ints.append((pos, 4))
        (vt,) = i32(data, pos)
        pos += 4
        if vt == 9:
            ints += [(pos, 4), (pos + 4, 8)]
            et, n = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if et == 8:
                for k in range(n):
                    if k < 3:
                        ints.append((pos, 8))
                    pos += 8 + q(data, pos)[0]
            else:
                pos += n * _WIDTHS[et]
        elif vt == 8:
            ints.append((pos, 8))
            pos += 8 + q(data, pos)[0]
        else:
            if vt in _INT_WIDTHS:
                ints.append((pos, _INT_WIDTHS[vt]))
            pos += _WIDTHS[vt]
        kvs.append((start, pos))
    for _ in range(n_tensors):
        start = pos
        ints.append((pos, 8))
        pos += 8 + q(data, pos)[0]
        (nd,) = i32(data, pos)
        ints += [(pos, 4)] + [(pos + 4 + 8 * k, 8) for k in range(nd)]
        pos += 4 + 8 * nd
        ints += [(pos, 4), (pos + 4, 8)]
        pos += 12
        tis.append((start, pos))
    return GGUFLayout(ints, kvs, tis, pos)


def _put_int(b: bytearray, off: int, width: int, v: int) -> None:
    b[off:off + width] = (v & ((1 << (8 * width)) - 1)).to_bytes(width, "little")


def _bump_count(b: bytearray, at: int, delta: int) -> None:
    (n,) = struct.unpack_from("<Q", b, at)
    struct.pack_into("<Q", b, at, (n + delta) & ((1 << 64) - 1))


def _region(rng: random.Random, size: int, header_end: int) -> int:
    """A position, mostly in the header (where parsing happens)."""
    if rng.random() < 0.9:
        return rng.randrange(min(size, header_end + 64))
    return rng.randrange(size)


def mutate_gguf(data: bytes, lay: GGUFLayout, rng: random.Random) -> tuple[str, bytes]:
    """One mutant of a GGUF seed: (mutator name, bytes)."""
    b = bytearray(data)
    kind = rng.choice(("flip", "flip", "bytes", "extreme", "extreme", "extreme", "nudge", "truncate",
                       "splice", "dup_tensor", "drop_tensor", "swap_tensor", "dup_kv", "drop_kv"))
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            p = _region(rng, len(b), lay.header_end)
            b[p] ^= 1 << rng.randrange(8)
    elif kind == "bytes":
        p = _region(rng, len(b), lay.header_end)
        for k in range(rng.randint(1, 8)):
            if p + k < len(b):
                b[p + k] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))
    elif kind == "extreme":
        off, w = rng.choice(lay.ints)
        _put_int(b, off, w, rng.choice(EXTREMES))
    elif kind == "nudge":
        off, w = rng.choice(lay.ints)
        v = int.from_bytes(b[off:off + w], "little")
        _put_int(b, off, w, rng.choice((v + 1, v - 1, v * 2, v // 2, v + 32, v + (1 << 31))))
    elif kind == "truncate":
        del b[rng.choice((rng.randrange(len(b)), _region(rng, len(b), lay.header_end),
                          rng.choice(lay.ints)[0])):]
    elif kind == "splice":
        n = rng.randint(1, 256)
        src, dst = _region(rng, len(b), lay.header_end), _region(rng, len(b), lay.header_end)
        chunk = bytes(b[src:src + n])
        how = rng.randrange(3)
        if how == 0:
            b[dst:dst + len(chunk)] = chunk
        elif how == 1:
            b[dst:dst] = chunk
        else:
            del b[dst:dst + n]
    elif kind in ("dup_tensor", "drop_tensor", "swap_tensor") and lay.tensor_records:
        recs = lay.tensor_records
        k = rng.randrange(len(recs))
        s, e = recs[k]
        if kind == "dup_tensor":
            b[e:e] = b[s:e]
            _bump_count(b, 8, 1)
        elif kind == "drop_tensor":
            del b[s:e]
            _bump_count(b, 8, -1)
        elif len(recs) > 1:
            j = (k + 1) % len(recs) if k + 1 < len(recs) else k - 1
            (s1, e1), (s2, e2) = sorted((recs[k], recs[j]))
            b[s1:e2] = b[s2:e2] + b[e1:s2] + b[s1:e1]
    elif kind in ("dup_kv", "drop_kv") and lay.kv_records:
        s, e = rng.choice(lay.kv_records)
        if kind == "dup_kv":
            b[e:e] = b[s:e]
            _bump_count(b, 16, 1)
        else:
            del b[s:e]
            _bump_count(b, 16, -1)
    return kind, bytes(b)


# ---------------------------------------------------------------- JSON files

HOSTILE_VALUES = (0, -1, 1 << 31, 1 << 63, (1 << 64) - 1, 10 ** 40, -(1 << 63), 1.5, 1e308, float("inf"),
                  float("nan"), "two", "", "x" * 5000, None, True, False, [], [1, 2], {}, {"a": 1})


def _pick_path(obj, rng: random.Random, depth: int = 0):
    """(container, key) of a random value inside a JSON object."""
    if isinstance(obj, dict) and obj:
        k = rng.choice(list(obj))
    elif isinstance(obj, list) and obj:
        k = rng.randrange(len(obj))
    else:
        return None
    v = obj[k]
    if depth < 3 and isinstance(v, (dict, list)) and v and rng.random() < 0.6:
        return _pick_path(v, rng, depth + 1) or (obj, k)
    return obj, k


def mutate_json(doc, rng: random.Random):
    """A structural mutant of a parsed JSON document (the document is modified in place)."""
    picked = _pick_path(doc, rng)
    if picked is None:
        return "replace_root", rng.choice(([], "x", 1, None))
    obj, k = picked
    how = rng.randrange(5)
    if how == 0 and isinstance(obj, dict):
        del obj[k]
        return "delete", doc
    if how == 1:
        v = obj[k]
        if isinstance(v, int) and not isinstance(v, bool):
            obj[k] = rng.choice((v + 1, v - 1, -v, v * 1000, 0))
            return "nudge", doc
    obj[k] = rng.choice(HOSTILE_VALUES)
    return "hostile", doc


def mutate_json_bytes(text: bytes, rng: random.Random) -> tuple[str, bytes]:
    b = bytearray(text)
    how = rng.randrange(3)
    if how == 0:
        for _ in range(rng.randint(1, 4)):
            p = rng.randrange(len(b))
            b[p] ^= 1 << rng.randrange(8)
        return "flip", bytes(b)
    if how == 1:
        return "truncate", bytes(b[:rng.randrange(len(b))])
    p = rng.randrange(len(b))
    return "splice", bytes(b[:p] + b[rng.randrange(len(b)):][:64] + b[p:])


def mutate_safetensors(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """A mutant of a safetensors file: its JSON header (structurally or as bytes) or its
    8-byte header length."""
    (n,) = struct.unpack_from("<Q", data, 0)
    header, body = data[8:8 + n], data[8 + n:]
    r = rng.random()
    if r < 0.15:
        b = bytearray(data)
        _put_int(b, 0, 8, rng.choice(EXTREMES + (n + 1, n - 1, len(data))))
        return "length", bytes(b)
    if r < 0.25:
        return "truncate", data[:rng.randrange(len(data))]
    if r < 0.55:
        kind, h = mutate_json_bytes(header, rng)
    else:
        kind, doc = mutate_json(json.loads(header), rng)
        h = json.dumps(doc).encode()
    if rng.random() < 0.5:
        h = h + b" " * ((8 - len(h) % 8) % 8)
    return kind, struct.pack("<Q", len(h)) + h + body


# ---------------------------------------------------------------- running a case

class Hang(BaseException):
    """Raised by the per-case alarm: BaseException, so no `except Exception` swallows it."""


@dataclass
class Outcome:
    kind: str            # ok | refused | traceback | hang
    detail: str = ""
    peak_bytes: int = 0  # traced Python/numpy allocation peak during the case


def _one_line(err: str) -> bool:
    lines = [x for x in err.strip().splitlines() if x.strip()]
    return len(lines) == 1 and "Traceback" not in err


def run_case(fn, limit_s: float = 10.0, trace_memory: bool = True) -> Outcome:
    """Run fn() (which returns None for a valid result, or a stderr string from a CLI run that
    must be one line) under a time limit; QuantkitError (and GGUFFormatError from the bare
    container reader) count as clean refusals."""
    from quantkit.models.gguf_file import GGUFFormatError
    from quantkit.util.errors import QuantkitError

    def alarm(*_):
        raise Hang()

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    if trace_memory:
        tracemalloc.reset_peak()
    try:
        err = fn()
        out = Outcome("ok") if not err else (Outcome("refused", err.strip()) if _one_line(err)
                                            else Outcome("traceback", err))
    except Hang:
        out = Outcome("hang", traceback.format_exc(limit=-3))
    except (QuantkitError, GGUFFormatError) as e:
        msg = str(e)
        out = Outcome("refused", msg) if "\n" not in msg else Outcome("traceback", "multi-line: " + msg)
    except BaseException:  # noqa: BLE001 - classifying every escape is the point
        out = Outcome("traceback", traceback.format_exc())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    if trace_memory:
        out.peak_bytes = tracemalloc.get_traced_memory()[1]
    return out


def cli(args: list[str]) -> str:
    """quantkit ARGS in-process: "" on exit 0, else the stderr (an error a run must print as one
    line); an exception escaping main propagates (a traceback)."""
    from quantkit.cli import main
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(args)
    if code == 0:
        return ""
    return err.getvalue() or f"exit {code} with nothing printed\nno message"


def open_gguf(path: str, load_tensors: bool) -> None:
    """The GGUF readers every command uses: the container, the model source (hyper-parameters
    checked) and, when asked, every tensor dequantized."""
    from quantkit.models.gguf import GGUFSource
    from quantkit.models.gguf_file import GGUFFile
    GGUFFile(path).close()
    src = GGUFSource(path)
    try:
        if load_tensors:
            for t in src.tensors():
                src.load(t.name)
    finally:
        src.close()


def gguf_case(path: str, with_cli: bool, load_tensors: bool = True) -> str:
    open_gguf(path, load_tensors)
    if with_cli:
        return cli(["plan", path]) or cli(["inspect", path, "--json"])
    return ""


def hf_case(model_dir: str, with_cli: bool) -> str:
    """A tiny HF directory: its safetensors header and bytes, the planner, and the CLI."""
    from quantkit.models.safetensors_file import SafetensorsFile
    from quantkit.plan.model import from_hf_dir
    st = os.path.join(model_dir, "model.safetensors")
    with SafetensorsFile(st) as f:
        for name, e in f.entries.items():
            f.read(name, e.begin, e.nbytes)
    from_hf_dir(model_dir)
    if with_cli:
        return cli(["plan", model_dir])
    return ""


# ---------------------------------------------------------------- seeds

def gemma_meta(bundled: str, n_tokens: int | None, sizes: dict[str, int]):
    """The bundled model's metadata, the vocabulary cut to its first n_tokens (None: all) and
    the size keys replaced by `sizes`."""
    from gguf import GGUFValueType
    from quantkit.models.gguf_file import GGUFFile
    from quantkit.models.source import MetaValue
    f = GGUFFile(bundled)
    meta = {}
    for k, fld in f.fields.items():
        v = fld.value
        if n_tokens is not None and k in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            v = list(v)[:n_tokens]
        meta[k] = MetaValue(v, fld.vtype, fld.sub_type)
    for k, v in sizes.items():
        meta[f"gemma3.{k}"] = MetaValue(v, GGUFValueType.UINT32)
    f.close()
    return meta


def write_model(path: str, meta, tensors) -> str:
    """A GGUF through quantkit's writer: `tensors` lists (name, shape, type); random values."""
    import numpy as np
    from quantkit.codecs.registry import qtype
    from quantkit.models.gguf import write_gguf_file
    rng = np.random.default_rng(0)

    def produce(name):
        import torch
        shape, tname = next((s, t) for n, s, t in tensors if n == name)
        x = rng.standard_normal(shape).astype(np.float32)
        if tname == "f32":
            return x
        return qtype(tname).quantize_rows(torch.from_numpy(x).reshape(-1, shape[-1])).numpy()
    write_gguf_file(path, "gemma3", meta, tensors, produce)
    return path


def tiny_gguf_seed(path: str, bundled: str) -> str:
    """A 2-layer Gemma-3 GGUF with the bundled model's metadata and its first 512 tokens: small
    enough for thousands of cases, valid for quantkit and llama.cpp alike."""
    return write_model(path, *tiny_gguf_parts(bundled))


def tiny_gguf_parts(bundled: str):
    """(metadata, tensor list) of tiny_gguf_seed, to edit before writing."""
    E, F, H, KV, D, V = 64, 128, 4, 1, 16, 512
    meta = gemma_meta(bundled, V, dict(block_count=2, embedding_length=E, feed_forward_length=F,
                                        **{"attention.head_count": H, "attention.head_count_kv": KV,
                                           "attention.key_length": D, "attention.value_length": D,
                                           "context_length": 256, "attention.sliding_window": 8}))
    tensors = [("token_embd.weight", (V, E), "q8_0"), ("output_norm.weight", (E,), "f32")]
    for i in range(2):
        p = f"blk.{i}."
        tensors += [(p + "attn_norm.weight", (E,), "f32"), (p + "attn_q.weight", (H * D, E), "q4_0"),
                    (p + "attn_k.weight", (KV * D, E), "q8_0"), (p + "attn_v.weight", (KV * D, E), "q8_0"),
                    (p + "attn_output.weight", (E, H * D), "q4_1"), (p + "ffn_down.weight", (E, F), "f16")]
    return meta, tensors


def bundled_header_seed(path: str, bundled: str) -> str:
    """The bundled model's whole header (262k-token vocabulary, ~6.5 MB) with a few small tensors
    after it: the real header, valid for quantkit and llama.cpp, cheap to rewrite."""
    meta = gemma_meta(bundled, None, {})
    tensors = [("output_norm.weight", (640,), "f32"), ("blk.0.attn_norm.weight", (640,), "f32"),
               ("blk.0.attn_q.weight", (1024, 640), "q8_0"), ("blk.0.attn_k.weight", (256, 640), "q4_0")]
    return write_model(path, meta, tensors)


def tiny_hf_seed(model_dir: str) -> str:
    """A tiny random llama saved as Hugging Face does: config.json and model.safetensors."""
    from helpers.tiny_models import tiny_model
    tiny_model("llama", vocab=256).save_pretrained(model_dir, safe_serialization=True)
    return model_dir


def warm_up(gguf_seed: str, hf_dir: str | None = None) -> None:
    """Import everything a case touches and run the seeds once, outside any time limit."""
    gguf_case(gguf_seed, True)
    if hf_dir:
        hf_case(hf_dir, True)


# ---------------------------------------------------------------- llama.cpp as the oracle

ORACLE = r"""
import ctypes, sys
import llama_cpp
llama_cpp.llama_backend_init()
cb = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)(lambda *a: None)
llama_cpp.llama_log_set(cb, None)
p = llama_cpp.llama_model_default_params()
p.vocab_only = True
for line in sys.stdin:
    m = llama_cpp.llama_model_load_from_file(line.strip().encode(), p)
    sys.stdout.write("1\n" if m else "0\n")
    sys.stdout.flush()
    if m:
        llama_cpp.llama_model_free(m)
"""


class Oracle:
    """llama.cpp's model loader (vocab only: the container, hyper-parameters and vocabulary) in a
    worker process; a crash (an abort on a failed assert, a segfault) counts as a refusal."""

    def __init__(self, limit_s: float = 60.0):
        self.p = None
        self.crashes = 0
        self.limit_s = limit_s

    def _start(self):
        self.p = subprocess.Popen([sys.executable, "-c", ORACLE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True)

    def accepts(self, path: str) -> bool:
        if self.p is None or self.p.poll() is not None:
            self._start()
        try:
            self.p.stdin.write(path + "\n")
            self.p.stdin.flush()
            ready, _, _ = select.select([self.p.stdout], [], [], self.limit_s)
            r = self.p.stdout.readline() if ready else ""
            if not ready:
                self.p.kill()
        except BrokenPipeError:
            r = ""
        if r.strip() in ("0", "1"):
            return r.strip() == "1"
        self.crashes += 1
        self.p.wait()
        self.p = None
        return False

    def close(self):
        if self.p is not None:
            self.p.stdin.close()
            self.p.wait()


def duplicate_tokens(path: str) -> bool:
    """Whether a GGUF's vocabulary holds the same token twice as llama.cpp reads tokens (C strings:
    up to the first NUL byte; an empty one is "[EMPTY_i]"); llama.cpp aborts on it. quantkit's
    reader does not look for this (it would double the time to open a 262k vocabulary); its
    writer refuses such a vocabulary."""
    from quantkit.models.gguf_file import GGUFFile
    f = GGUFFile(path)
    try:
        toks = f.fields["tokenizer.ggml.tokens"].value
        p, pos, seen = toks.payload, 0, set()
        for i in range(len(toks)):
            (n,) = struct.unpack_from("<Q", p, pos)
            seen.add(p[pos + 8:pos + 8 + n].split(b"\0", 1)[0] or b"[EMPTY_%d]" % i)
            pos += 8 + n
        return len(seen) < len(toks)
    finally:
        f.close()
