"""A GGUF model's hyper-parameters, read from its metadata and checked before anything uses them.

Every reader of a GGUF model (the GGUF source the quantizers and eval use, the planner) takes
its sizes from here, so a wrong-typed, zero, negative or inconsistent value ends in the same
one-line QuantkitError naming the key, whichever command met it. Checked: the type (an
integer is an integer, not a bool, float or string), the range (head counts positive, the KV
heads dividing the heads, no size past what any model has), and agreement with the tensors
the file holds (the embedding's width and rows, the attention projections' sizes, no block
index past block_count). Torch-free: the planner imports it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from gguf import GGUFValueType

from ..util.errors import QuantkitError

_INTS = {GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
         GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64}
# The tokenizers llama.cpp's vocabulary loader knows (src/llama-vocab.cpp).
TOKENIZER_MODELS = {"no_vocab", "none", "llama", "bert", "gpt2", "hybriddna", "whitespace", "t5", "rwkv",
                    "test", "plamo2", "gemma4"}
# Keys llama.cpp reads with a fixed type; any other type makes it refuse the file.
_TYPED_KEYS = {
    **{f"tokenizer.ggml.{k}": GGUFValueType.BOOL for k in (
        "add_bos_token", "add_eos_token", "add_sep_token", "add_space_prefix", "remove_extra_whitespaces")},
    **{f"tokenizer.ggml.{k}_token_id": GGUFValueType.UINT32 for k in (
        "bos", "eos", "eot", "eom", "unknown", "seperator", "padding", "mask", "fim_pre", "fim_suf", "fim_mid",
        "fim_pad", "fim_rep", "fim_sep", "prefix", "suffix", "middle")},
    "tokenizer.ggml.model": GGUFValueType.STRING, "tokenizer.ggml.pre": GGUFValueType.STRING,
    "general.name": GGUFValueType.STRING, "general.file_type": GGUFValueType.UINT32,
}
# Past these no released model goes; a larger value is corruption, and it would size caches.
_MAX_LAYERS = 1 << 12
_MAX_WIDTH = 1 << 20
_MAX_HEADS = 1 << 14
_MAX_CONTEXT = 1 << 31
_MAX_EXPERTS = 1 << 12
_BLOCK = re.compile(r"blk\.(\d+)\.")


@dataclass(frozen=True)
class GGUFHParams:
    arch: str
    n_layer: int
    n_embd: int
    n_head: int                  # the largest, when the file gives one per layer
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    sliding_window: int | None
    sliding_window_pattern: list[bool] | None   # as stored, when stored
    layer_norm: bool
    rope_theta: float | None
    n_expert: int
    n_expert_used: int


class _Reader:
    def __init__(self, meta: Mapping, path: str):
        self.meta, self.path = meta, path

    def fail(self, key: str, what: str, hint: str = "the file is damaged or was written wrongly; re-create it"):
        raise QuantkitError(f"GGUF metadata {key}: {what}", self.path, hint)

    def int(self, key: str, lo: int, hi: int, default=None, per_layer: int | None = None):
        """An integer key in [lo, hi]; with per_layer, an array of that many such integers is
        accepted too (returned as a list)."""
        f = self.meta.get(key)
        if f is None:
            if default is None:
                self.fail(key, "is missing", "the file is not a complete model")
            return default
        if f.vtype == GGUFValueType.ARRAY and per_layer is not None:
            vals = f.value
            if f.sub_type not in (GGUFValueType.INT32, GGUFValueType.UINT32):
                self.fail(key, f"is an array of {f.sub_type.name.lower()}, expected int32 or uint32")
            if len(vals) != per_layer:
                self.fail(key, f"has {len(vals)} entries for {per_layer} layers")
            bad = next((v for v in vals if not lo <= v <= hi), None)
            if bad is not None:
                self.fail(key, f"holds {bad}, outside [{lo}, {hi}]")
            return list(vals)
        if f.vtype != GGUFValueType.UINT32:
            self.fail(key, f"is of type {f.vtype.name.lower()} ({_short(f.value)}), expected uint32")
        if not lo <= f.value <= hi:
            self.fail(key, f"= {f.value} is outside [{lo}, {hi}]")
        return f.value

    def float(self, key: str, positive: bool = True, required: bool = False):
        f = self.meta.get(key)
        if f is None:
            if required:
                self.fail(key, "is missing", "the file is not a complete model")
            return None
        if f.vtype != GGUFValueType.FLOAT32:
            self.fail(key, f"is of type {f.vtype.name.lower()} ({_short(f.value)}), expected float32")
        v = float(f.value)
        if not math.isfinite(v) or (positive and v <= 0):
            self.fail(key, f"= {v} is not a positive finite number")
        return v


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:60] + "..."


def _max(v):
    return max(v) if isinstance(v, list) else v


def read_hparams(meta: Mapping, tensors: Mapping[str, tuple[int, ...]], path: str) -> GGUFHParams:
    """`meta`: key -> object with .value/.vtype/.sub_type (GGUFField, MetaValue); `tensors`:
    name -> row-major shape. QuantkitError naming the key when a value is wrong."""
    r = _Reader(meta, path)
    af = meta.get("general.architecture")
    if af is None:
        raise QuantkitError("GGUF has no general.architecture", path, "is this a model file?")
    if af.vtype != GGUFValueType.STRING or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", af.value):
        r.fail("general.architecture", f"= {_short(af.value)} is not an architecture name")
    arch = af.value
    n_layer = r.int(f"{arch}.block_count", 1, _MAX_LAYERS)
    n_embd = r.int(f"{arch}.embedding_length", 1, _MAX_WIDTH)
    heads = r.int(f"{arch}.attention.head_count", 0, _MAX_HEADS, per_layer=n_layer)
    n_head = _max(heads)
    if n_head <= 0:
        r.fail(f"{arch}.attention.head_count", "is 0: a model needs attention heads")
    kv = r.int(f"{arch}.attention.head_count_kv", 0, _MAX_HEADS, default=heads, per_layer=n_layer)
    for i, (h, k) in enumerate(zip(*(x if isinstance(x, list) else [x] * n_layer for x in (heads, kv)))):
        if h and not k:
            r.fail(f"{arch}.attention.head_count_kv", f"is 0 for layer {i} that has {h} heads")
        if k and h % k:
            r.fail(f"{arch}.attention.head_count_kv", f"= {k} does not divide head_count {h} (layer {i})")
    n_head_kv = _max(kv)
    head_dim = r.int(f"{arch}.attention.key_length", 1, _MAX_WIDTH,
                     default=n_embd // n_head if n_embd % n_head == 0 else 0)
    if head_dim == 0:
        r.fail(f"{arch}.attention.head_count", f"= {n_head} does not divide embedding_length {n_embd} "
               "and attention.key_length is not given")
    r.int(f"{arch}.attention.value_length", 1, _MAX_WIDTH, default=head_dim)
    n_ff = _max(r.int(f"{arch}.feed_forward_length", 0, _MAX_WIDTH << 4, default=0, per_layer=n_layer))
    n_ctx = r.int(f"{arch}.context_length", 1, _MAX_CONTEXT)
    n_tokens = check_tokenizer(r, meta)
    emb = tensors.get("token_embd.weight")
    n_vocab = r.int(f"{arch}.vocab_size", 1, 1 << 31, default=n_tokens or (emb[0] if emb else 0))
    window = r.int(f"{arch}.attention.sliding_window", 0, _MAX_CONTEXT, default=0) or None
    pattern = None
    pf = meta.get(f"{arch}.attention.sliding_window_pattern")
    if pf is not None and window:
        if pf.vtype == GGUFValueType.ARRAY:
            if pf.sub_type not in _INTS and pf.sub_type != GGUFValueType.BOOL:
                r.fail(f"{arch}.attention.sliding_window_pattern",
                       f"is an array of {pf.sub_type.name.lower()}, expected booleans")
            if len(pf.value) != n_layer:
                r.fail(f"{arch}.attention.sliding_window_pattern", f"has {len(pf.value)} entries for {n_layer} layers")
            pattern = [bool(p) for p in pf.value]
        else:
            r.int(f"{arch}.attention.sliding_window_pattern", 1, _MAX_LAYERS)
    n_expert = r.int(f"{arch}.expert_count", 0, _MAX_EXPERTS, default=0)
    eps = f"{arch}.attention.layer_norm_epsilon"
    if eps not in meta:      # llama.cpp requires one of the two norm epsilons of every model
        r.float(f"{arch}.attention.layer_norm_rms_epsilon", required=True)
    n_expert_used = r.int(f"{arch}.expert_used_count", 0, _MAX_EXPERTS, default=0)
    if n_expert_used > n_expert:
        r.fail(f"{arch}.expert_used_count", f"= {n_expert_used} is more than expert_count {n_expert}")
    hp = GGUFHParams(
        arch=arch, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
        n_ff=n_ff, n_vocab=n_vocab, n_ctx_train=n_ctx, sliding_window=window, sliding_window_pattern=pattern,
        layer_norm=r.float(f"{arch}.attention.layer_norm_epsilon") is not None,
        rope_theta=r.float(f"{arch}.rope.freq_base"), n_expert=n_expert, n_expert_used=n_expert_used)
    check_tensors(hp, tensors, n_tokens, path)
    return hp


def check_tokenizer(r: _Reader, meta: Mapping) -> int:
    """The vocabulary as llama.cpp's loader requires it; the number of tokens."""
    for key, vt in _TYPED_KEYS.items():
        f = meta.get(key)
        if f is not None and f.vtype != vt:
            r.fail(key, f"is of type {f.vtype.name.lower()}, expected {vt.name.lower()}")
    mf = meta.get("tokenizer.ggml.model")
    if mf is None:
        r.fail("tokenizer.ggml.model", "is missing", "the file has no tokenizer; llama.cpp cannot load it")
    if mf.value not in TOKENIZER_MODELS:
        r.fail("tokenizer.ggml.model", f"= {_short(mf.value)} is not a tokenizer llama.cpp knows "
               f"({', '.join(sorted(TOKENIZER_MODELS))})")
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        if mf.value in ("none", "no_vocab"):
            return 0
        r.fail("tokenizer.ggml.tokens", "is missing", "the file has no vocabulary; llama.cpp cannot load it")
    if tokens.vtype != GGUFValueType.ARRAY or tokens.sub_type != GGUFValueType.STRING:
        r.fail("tokenizer.ggml.tokens", "is not an array of strings")
    n = len(tokens.value)
    for key, types in (("tokenizer.ggml.scores", (GGUFValueType.FLOAT32, GGUFValueType.INT32)),
                       ("tokenizer.ggml.token_type", (GGUFValueType.INT32,))):
        f = meta.get(key)
        if f is None:
            continue
        if f.vtype != GGUFValueType.ARRAY or f.sub_type not in types:
            r.fail(key, f"is not an array of {' or '.join(t.name.lower() for t in types)}")
        if len(f.value) < n:
            r.fail(key, f"has {len(f.value)} entries for {n} tokens")
    return n


def check_tensors(hp: GGUFHParams, tensors: Mapping[str, tuple[int, ...]], n_tokens: int, path: str) -> None:
    """The tensors' shapes agree with the hyper-parameters (the ones every architecture shares)."""
    def bad(name, shape, want):
        raise QuantkitError(f"tensor {name!r} has shape {list(shape)}, but the metadata implies {want}", path,
                            "the file is damaged or was written wrongly; re-create it")

    for name in ("token_embd.weight", "output.weight"):
        shape = tensors.get(name)
        if shape is None:
            continue
        if len(shape) != 2 or shape[1] != hp.n_embd:
            bad(name, shape, f"[rows, {hp.n_embd}] ({hp.arch}.embedding_length)")
        if n_tokens and shape[0] != n_tokens:
            bad(name, shape, f"[{n_tokens}, {hp.n_embd}] ({n_tokens} tokens in tokenizer.ggml.tokens)")
    for name, shape in tensors.items():
        m = _BLOCK.match(name)
        if m and int(m.group(1)) >= hp.n_layer:
            raise QuantkitError(f"tensor {name!r} lies past {hp.arch}.block_count = {hp.n_layer}", path,
                                "the file is damaged or was written wrongly; re-create it")
        if m and name.endswith((".attn_q.weight", ".attn_k.weight", ".attn_v.weight")) \
                and len(shape) == 2 and shape[1] != hp.n_embd:
            bad(name, shape, f"[heads * head_dim, {hp.n_embd}] ({hp.arch}.embedding_length)")
