"""`quantkit eval`: quality, size, speed and memory of a set of models against one reference.

Protocol (llama.cpp's `llama-perplexity`, so the numbers compare with llama.cpp's own): the text
is tokenized once, by the reference's tokenizer, with BOS first when the vocabulary adds one;
chunk i is tokens [i*n_ctx, (i+1)*n_ctx) with its first token replaced by BOS; each chunk is one
forward pass from an empty KV cache, and only the second half is scored: the logits at positions
n_ctx/2 .. n_ctx-2 against the tokens that follow (n_ctx/2 - 1 predictions per chunk). Every model
sees the same token ids; a model whose vocabulary differs from the reference's is refused.

Efficiency: the reference's log-softmax over the scored positions of one chunk (float32, kept
exact for the KL divergence: 255 x 262144 x 4 B = 268 MB for Gemma-3 at n_ctx 512) is written
once to a memory-mapped cache file keyed by the reference file's SHA-256, the runtime and the
chunk's token ids; each model then needs one forward pass per chunk and reads the reference
chunk back memory-mapped. N models cost N + 1 passes (N when the reference is cached), and at
most one chunk of full-vocabulary values is in memory at a time. The cache is capped (least
recently used files deleted after each run; --cache-max, $QUANTKIT_EVAL_CACHE_MAX, default 4 GiB):
see eval/cache.py. llama.cpp's logits are read as
a numpy view of its own output buffer (no copy), and only the scored rows are computed at all
(llama_batch.logits flags), which is what makes this faster than Llama(logits_all=True).

Speed and memory: each model is loaded again in a fresh subprocess that measures load time,
prompt processing (n_prompt tokens in one batch) and generation (n_gen greedy tokens) over a few
runs (median reported, threads stated, llama.cpp's own perf counters alongside) and the process's
peak RSS (VmHWM, with the RSS before loading stated so the model's share is visible).

Encoder classifiers (BERT-family directories with a classification head) are scored by task
accuracy instead, in the same result shape: see eval/classify.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..recipe import LADDER_CALIBRATION, calib_text_path, parse_recipe, valid_spellings
from ..util.atomic import atomic_output, check_writable_dir
from ..util.errors import QuantkitError
from ..util.progress import progress
from . import cache as eval_cache
from . import metrics

PROTOCOL = "llama.cpp perplexity protocol"


# ------------------------------------------------------------------------- options, result
@dataclass
class EvalOptions:
    ref: str | None = None          # None: the F32 dequantization of the first model
    text: str | None = None         # None: QUANTKIT_EVAL_TEXT or the wikitext-2 test split
    n_chunks: int = 8               # 0: every full chunk of the text (llama.cpp's default)
    n_ctx: int = 512
    n_threads: int | None = None    # None: all cores
    speed: bool = True              # load / prompt / generation / peak RSS, in a subprocess
    speed_runs: int = 3
    n_prompt: int = 128
    n_gen: int = 32
    cache: bool = True              # keep reference log-probabilities between runs
    cache_max: int | str | None = None  # cap of the eval cache (bytes or "4G"); None: $QUANTKIT_EVAL_CACHE_MAX or 4 GiB
    task_data: str | None = None    # classifiers: label<TAB>text file; None: $QUANTKIT_EVAL_TASK_DATA or SST-2 dev
    task_limit: int | None = None   # classifiers: score the first N examples only
    batch_size: int = 32            # classifiers: sentences per forward pass
    show_progress: bool = True


@dataclass
class EvalResult:
    rows: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"meta": self.meta, "models": self.rows}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_json_default)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o).__name__)


# ------------------------------------------------------------------------- files, hashing
def _cache_root() -> str:
    from ..models.bundled import cache_dir
    d = os.path.join(cache_dir(), "eval")
    os.makedirs(d, exist_ok=True)
    return d


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def model_digest(path: str) -> str:
    """SHA-256 of a model file (or of a directory's files), memoised by path, size and mtime so
    a 1 GB reference is hashed once, not on every run."""
    path = os.path.realpath(path)
    files = ([os.path.join(path, n) for n in sorted(os.listdir(path)) if os.path.isfile(os.path.join(path, n))]
             if os.path.isdir(path) else [path])
    memo_path = os.path.join(_cache_root(), "digests.json")
    try:
        with open(memo_path) as f:
            memo = json.load(f)
    except (OSError, ValueError):
        memo = {}
    h = hashlib.sha256()
    changed = False
    digests = []
    for p in files:
        st = os.stat(p)
        key = f"{p}:{st.st_size}:{st.st_mtime_ns}"
        if key not in memo:
            memo[key] = _sha256_file(p)
            changed = True
        digests.append(memo[key])
        h.update(os.path.basename(p).encode() + b"\0" + memo[key].encode())
    if changed:
        try:
            with atomic_output(memo_path) as tmp, open(tmp, "w") as f:
                json.dump(memo, f)
        except (OSError, QuantkitError):
            pass  # a read-only cache only costs re-hashing
    return h.hexdigest() if os.path.isdir(path) else digests[0]


TORCH_PREFIX = "torch:"  # "torch:model.gguf": a GGUF run in transformers (weights dequantized to F32)


def split_spec(spec: str) -> tuple[str, bool]:
    """A model argument -> (path, forced to torch)."""
    return (spec[len(TORCH_PREFIX):], True) if spec.startswith(TORCH_PREFIX) else (spec, False)


def normalize_spec(spec) -> str:
    path, forced = split_spec(os.fspath(spec))
    return (TORCH_PREFIX if forced else "") + os.path.abspath(path)


def runtime_kind(spec: str) -> str:
    path, forced = split_spec(spec)
    if os.path.isdir(path) or (forced and os.path.isfile(path)):
        return "torch"
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise QuantkitError(f"cannot read: {e.strerror}", path) from None
    if magic == b"GGUF":
        return "llama.cpp"
    raise QuantkitError("not a model quantkit can evaluate (neither GGUF nor a Hugging Face directory)", path)


@dataclass
class ModelFacts:
    path: str
    runtime: str
    n_params: int
    file_bytes: int
    tensor_bytes: int
    linear_params: int
    linear_bytes: int
    types: dict[str, int]
    all_f32: bool
    vocab: list[str]


def describe(spec: str) -> ModelFacts:
    """Sizes, tensor types and vocabulary from the file headers (opening the model names the
    file and the reason when it is damaged)."""
    from ..models.open import open_model
    kind = runtime_kind(spec)
    path = split_spec(spec)[0]
    if os.path.isdir(path) and _quantization_config(path):
        return _describe_quantized_dir(spec, path)
    with open_model(path) as src:
        tensors = src.tensors()
        toks = src.metadata.get("tokenizer.ggml.tokens")
        vocab = [str(t) for t in (toks.value if toks is not None else [])]
    linear = [t for t in tensors if len(t.shape) >= 2 and t.name.startswith("blk.")]
    types: dict[str, int] = {}
    for t in tensors:
        types[t.type] = types.get(t.type, 0) + 1
    if os.path.isdir(path):
        file_bytes = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)
                         if n.endswith((".safetensors", ".bin")))
    else:
        file_bytes = os.path.getsize(path)
    return ModelFacts(path=spec, runtime=kind, n_params=sum(t.n_elements for t in tensors), file_bytes=file_bytes,
                      tensor_bytes=sum(t.nbytes for t in tensors),
                      linear_params=sum(t.n_elements for t in linear), linear_bytes=sum(t.nbytes for t in linear),
                      types=types, all_f32=all(t.type == "f32" for t in tensors), vocab=vocab)


def _quantization_config(path: str) -> dict | None:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            return json.load(f).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None


def _describe_quantized_dir(spec: str, path: str) -> ModelFacts:
    """ModelFacts of a GPTQ or compressed-tensors checkpoint directory, from its safetensors
    headers (logical parameter counts: a packed linear counts out x in) and its tokenizer's
    vocabulary (transformers)."""
    from safetensors import safe_open
    qc = _quantization_config(path) or {}
    if qc.get("quant_method") == "gptq":
        bits, gs = qc.get("bits"), qc.get("group_size")
    else:
        w = next(iter((qc.get("config_groups") or {}).values()), {}).get("weights") or {}
        bits, gs = w.get("num_bits"), w.get("group_size") or -1
    label = f"int{bits}-g{gs}" if bits else "packed"
    files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not files:
        raise QuantkitError("no *.safetensors in the checkpoint directory", path)
    nbytes: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    packed_shape: dict[str, tuple[int, int]] = {}
    for fn in files:
        with safe_open(os.path.join(path, fn), "pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                shape = tuple(sl.get_shape())
                dt = sl.get_dtype()
                shapes[name], dtypes[name] = shape, dt
                n = 1
                for d in shape:
                    n *= d
                nbytes[name] = n * {"F64": 8, "F32": 4, "I32": 4, "I64": 8, "F16": 2, "BF16": 2}.get(dt, 1)
                if name.endswith(".weight_shape"):
                    packed_shape[name.rsplit(".", 1)[0]] = tuple(int(x) for x in f.get_tensor(name).tolist())
    for name, shape in shapes.items():          # GPTQ layout: g_idx [in], scales [groups, out]
        if name.endswith(".g_idx"):
            prefix = name.rsplit(".", 1)[0]
            packed_shape.setdefault(prefix, (shapes[prefix + ".scales"][1], shape[0]))
    n_params = linear_params = linear_bytes = 0
    types: dict[str, int] = {}
    for name, shape in shapes.items():
        prefix = name.rsplit(".", 1)[0]
        is_linear = prefix in packed_shape
        if is_linear:
            linear_bytes += nbytes[name]
        else:
            n = 1
            for d in shape:
                n *= d
            n_params += n
            types[dtypes[name].lower()] = types.get(dtypes[name].lower(), 0) + 1
    for out_f, in_f in packed_shape.values():
        n_params += out_f * in_f
        linear_params += out_f * in_f
    types[label] = len(packed_shape)
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(path)
        vocab = [str(t) for t in tok.convert_ids_to_tokens(list(range(len(tok))))]
    except Exception as e:  # noqa: BLE001 - the checkpoint's tokenizer is the user's file
        raise QuantkitError(f"transformers could not read the checkpoint's tokenizer ({type(e).__name__})", path,
                            "the directory needs tokenizer files (tokenizer.json / tokenizer.model)") from None
    return ModelFacts(path=spec, runtime="torch", n_params=n_params,
                      file_bytes=sum(os.path.getsize(os.path.join(path, fn)) for fn in files),
                      tensor_bytes=sum(nbytes.values()), linear_params=linear_params, linear_bytes=linear_bytes,
                      types=types, all_f32=False, vocab=vocab)


def check_same_vocab(ref: ModelFacts, other: ModelFacts) -> None:
    if ref.vocab == other.vocab:
        return
    # SentencePiece's word boundary: '▁' in Hugging Face vocabularies, a space in some GGUFs
    if len(ref.vocab) == len(other.vocab) and all(a.replace("\u2581", " ") == b.replace("\u2581", " ")
                                                  for a, b in zip(ref.vocab, other.vocab)):
        return
    if len(ref.vocab) != len(other.vocab):
        why = f"{len(other.vocab)} tokens vs the reference's {len(ref.vocab)}"
    else:
        i = next(i for i, (a, b) in enumerate(zip(ref.vocab, other.vocab)) if a != b)
        why = f"token {i} is {other.vocab[i]!r}, the reference's is {ref.vocab[i]!r}"
    raise QuantkitError(f"vocabulary differs from the reference {os.path.basename(ref.path)} ({why})", other.path,
                        "models are scored on the same token ids; compare models that share a tokenizer")


def f32_reference(path: str, n_threads: int, show_progress: bool = True) -> str:
    """The F32 dequantization of a GGUF, made once into quantkit's cache by llama.cpp's own
    quantizer (llama_model_quantize, ftype ALL_F32, allow_requantize: every tensor dequantized
    to float32; the same bytes as `quantkit quantize --format gguf:f32`)."""
    import ctypes

    import llama_cpp
    digest = model_digest(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    out = os.path.join(_cache_root(), "refs", digest[:16], f"{stem}-f32.gguf")
    if os.path.exists(out):
        eval_cache.touch(out, keep_mtime=True)
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    bar = progress(total=1, desc="F32 reference (dequantize)", unit="file") if show_progress else None
    from .runtimes import _quiet_stderr
    with atomic_output(out) as tmp:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = 0  # LLAMA_FTYPE_ALL_F32
        params.allow_requantize = True
        params.nthread = n_threads
        with _quiet_stderr():
            rc = llama_cpp.llama_model_quantize(path.encode(), tmp.encode(), ctypes.byref(params))
        if rc != 0:
            raise QuantkitError(f"llama.cpp could not dequantize the model to F32 (code {rc})", path)
    eval_cache.touch(out, keep_mtime=True)
    if bar:
        bar.update(1)
        bar.close()
    return out


# ------------------------------------------------------------------------- runtimes
class LlamaCppScorer:
    """llama.cpp through the low-level API: one llama_batch per chunk with logits requested only
    for the scored rows, read as a numpy view of llama.cpp's output buffer."""
    kind = "llama.cpp"

    def __init__(self, path: str, n_ctx: int, n_threads: int | None = None, vocab_only: bool = False):
        import llama_cpp

        from .runtimes import LlamaCpp
        self._lib = llama_cpp
        self.rt = LlamaCpp(path, n_ctx=n_ctx, n_threads=n_threads, n_batch=n_ctx, vocab_only=vocab_only)
        self.llm = self.rt.llm
        self.path = path
        self.load_s = self.rt.load_s
        self.n_threads = self.rt.n_threads
        self.n_vocab = int(self.llm.n_vocab())
        self.cap = n_ctx
        self._batch = None

    def bos_id(self) -> int:
        return int(self.llm.token_bos())

    def add_bos(self) -> bool:
        lib = self._lib
        return bool(lib.llama_vocab_get_add_bos(lib.llama_model_get_vocab(self.llm.model)))

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def _decode(self, tokens, pos0: int, out_from: int, out_to: int) -> np.ndarray:
        lib = self._lib
        n = len(tokens)
        if n > self.cap:
            raise ValueError(f"{n} tokens > batch capacity {self.cap}")
        if self._batch is None:
            b = self._batch = lib.llama_batch_init(self.cap, 0, 1)
            for i in range(self.cap):
                b.seq_id[i][0] = 0
            # numpy views of the batch's C arrays, made once
            self._tok = np.ctypeslib.as_array(b.token, shape=(self.cap,))
            self._pos = np.ctypeslib.as_array(b.pos, shape=(self.cap,))
            np.ctypeslib.as_array(b.n_seq_id, shape=(self.cap,))[:] = 1
            self._flags = np.ctypeslib.as_array(b.logits, shape=(self.cap,))
        b = self._batch
        b.n_tokens = n
        self._tok[:n] = tokens
        self._pos[:n] = np.arange(pos0, pos0 + n)
        self._flags[:n] = 0
        self._flags[out_from:out_to] = 1
        rc = lib.llama_decode(self.llm.ctx, b)  # llama.cpp is silent here unless it fails
        if rc != 0:
            raise QuantkitError(f"llama_decode failed (code {rc})", self.path)
        ptr = lib.llama_get_logits(self.llm.ctx)
        return np.ctypeslib.as_array(ptr, shape=(out_to - out_from, self.n_vocab))

    def clear(self) -> None:
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self.llm.ctx), True)

    def scored_logits(self, tokens: list[int], first: int) -> np.ndarray:
        """Logits [len - 1 - first, n_vocab] at positions first .. len-2; a view, valid until
        the next call."""
        self.clear()
        return self._decode(tokens, 0, first, len(tokens) - 1)

    def timed_prompt(self, tokens: list[int]) -> float:
        self.clear()
        t0 = time.perf_counter()
        self._decode(tokens, 0, len(tokens) - 1, len(tokens))
        return time.perf_counter() - t0

    def timed_generate(self, tokens: list[int], n_gen: int) -> float:
        self.clear()
        logits = self._decode(tokens, 0, len(tokens) - 1, len(tokens))
        nxt = int(logits[0].argmax())
        t0 = time.perf_counter()
        for k in range(n_gen):
            logits = self._decode([nxt], len(tokens) + k, 0, 1)
            nxt = int(logits[0].argmax())
        return time.perf_counter() - t0

    def perf(self) -> dict[str, float]:
        d = self._lib.llama_perf_context(self.llm.ctx)
        return {"t_p_eval_ms": d.t_p_eval_ms, "n_p_eval": d.n_p_eval, "t_eval_ms": d.t_eval_ms, "n_eval": d.n_eval}

    def perf_reset(self) -> None:
        self._lib.llama_perf_context_reset(self.llm.ctx)

    def close(self) -> None:
        if self._batch is not None:
            self._lib.llama_batch_free(self._batch)
            self._batch = None
        self.rt.close()


def open_scorer(spec: str, n_ctx: int, n_threads: int | None, vocab_only: bool = False):
    path = split_spec(spec)[0]
    if runtime_kind(spec) == "torch" and not (vocab_only and os.path.isfile(path)):
        from .torch_runtime import TorchCausalLM
        return TorchCausalLM(path, n_threads=n_threads, from_gguf=os.path.isfile(path))
    return LlamaCppScorer(path, n_ctx=n_ctx, n_threads=n_threads, vocab_only=vocab_only)


def runtime_version(kind: str) -> str:
    if kind == "torch":
        import torch
        import transformers
        return f"torch {torch.__version__}, transformers {transformers.__version__}"
    import llama_cpp
    return f"llama-cpp-python {llama_cpp.__version__}"


# ------------------------------------------------------------------------- text and chunks
def default_text() -> str:
    from ..util.data import data_file
    return data_file("wikitext-2/test.txt", env="QUANTKIT_EVAL_TEXT")


def make_chunks(tokenize, text: str, n_ctx: int, n_chunks: int, add_bos: bool, bos: int | None,
                text_path: str) -> list[list[int]]:
    """Tokenize as llama-perplexity does (BOS first when the vocabulary adds it) and cut
    n_chunks chunks of n_ctx, BOS replacing each chunk's first token. Only a prefix of a long
    text is tokenized; a margin past the last needed token keeps the ids identical to those of
    the whole text."""
    if n_ctx < 8 or n_ctx % 2:
        raise QuantkitError(f"--ctx {n_ctx}: need an even context of at least 8 tokens")
    need = n_chunks * n_ctx if n_chunks > 0 else None
    margin = 64
    n_chars = len(text) if need is None else min(len(text), (need + margin) * 8 + 1024)
    while True:
        cut = text.find("\n", n_chars) if n_chars < len(text) else -1
        part = text if cut < 0 else text[:cut + 1]
        ids = ([bos] if add_bos else []) + list(tokenize(part))
        if need is None or len(ids) >= need + margin or len(part) == len(text):
            break
        n_chars = min(len(text), n_chars * 2)
    have = len(ids)
    if need is None:
        n_chunks = have // n_ctx
        need = max(n_chunks, 1) * n_ctx
    if have < need:
        raise QuantkitError(f"text too short: {have} tokens, {n_chunks} chunk(s) of {n_ctx} need {need}", text_path,
                            "give a longer --text, fewer --chunks or a smaller --ctx")
    chunks = []
    for i in range(n_chunks):
        c = ids[i * n_ctx:(i + 1) * n_ctx]
        if add_bos:
            c[0] = bos
        chunks.append(c)
    return chunks


def _load_ref(path: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise QuantkitError("a cached reference chunk disappeared during the run (pruned by another quantkit eval?)",
                            path, "run again, or give a larger --cache-max") from None


# ------------------------------------------------------------------------- speed probe
def _vm_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def probe(path: str, tokens: list[int], n_gen: int, runs: int, n_threads: int) -> dict[str, Any]:
    """Load, prompt processing and generation speed, peak RSS. Meant for a fresh process
    (`python -m quantkit.eval.evaluate probe ...`): peak RSS is this process's VmHWM."""
    rss0 = _vm_kib("VmRSS") * 1024
    n_ctx = len(tokens) + n_gen + 8
    n_ctx += n_ctx % 2
    sc = open_scorer(path, n_ctx, n_threads)
    try:
        pp, tg, lpp, ltg = [], [], [], []
        for r in range(runs + 1):  # run 0 warms caches (first touch of memory-mapped weights)
            if sc.kind == "llama.cpp":
                sc.perf_reset()
            dt = sc.timed_prompt(tokens)
            if sc.kind == "llama.cpp":
                p = sc.perf()
                sc.perf_reset()
            gt = sc.timed_generate(tokens, n_gen)
            if sc.kind == "llama.cpp":
                g = sc.perf()
            if r == 0:
                continue
            pp.append(len(tokens) / dt)
            tg.append(n_gen / gt)
            if sc.kind == "llama.cpp":
                if p["t_p_eval_ms"] > 0:
                    lpp.append(p["n_p_eval"] / p["t_p_eval_ms"] * 1e3)
                if g["t_eval_ms"] > 0:
                    # generate's prompt pass is counted under p_eval; single-token steps under eval
                    ltg.append(g["n_eval"] / g["t_eval_ms"] * 1e3)
        out = {"runtime": sc.kind, "threads": sc.n_threads, "load_s": sc.load_s, "runs": runs,
               "n_prompt": len(tokens), "n_gen": n_gen,
               "pp_tok_s": statistics.median(pp), "tg_tok_s": statistics.median(tg),
               "pp_tok_s_runs": pp, "tg_tok_s_runs": tg,
               "llama_pp_tok_s": statistics.median(lpp) if lpp else None,
               "llama_tg_tok_s": statistics.median(ltg) if ltg else None}
    finally:
        sc.close()
    out["rss_before_load_bytes"] = rss0
    out["peak_rss_bytes"] = _vm_kib("VmHWM") * 1024
    return out


def run_probe(path: str, tokens: list, n_gen: int, runs: int, n_threads: int, kind: str = "lm") -> dict[str, Any]:
    """`probe` (kind "lm": token ids) or `classify.probe_classifier` (kind "classifier": sentences)
    in a fresh Python process, so that peak RSS belongs to that model alone."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"path": path, "tokens": tokens, "n_gen": n_gen, "runs": runs, "n_threads": n_threads,
                   "kind": kind}, f)
        args_path = f.name
    try:
        env = dict(os.environ, QUANTKIT_QUIET="1")
        proc = subprocess.run([sys.executable, "-m", "quantkit.eval.evaluate", "probe", args_path],
                              capture_output=True, text=True, env=env)
    finally:
        os.unlink(args_path)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise QuantkitError(f"speed probe failed: {last}", path)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------- machine
def machine_info(n_threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    from .. import __version__
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": n_threads, "memory_bytes": mem,
            "os": platform.platform(), "python": platform.python_version(), "quantkit": __version__}
    try:
        import llama_cpp
        info["llama_cpp_python"] = llama_cpp.__version__
    except ImportError:
        pass
    if "torch" in sys.modules:
        info["torch"] = sys.modules["torch"].__version__
    if "transformers" in sys.modules:
        info["transformers"] = sys.modules["transformers"].__version__
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


# ------------------------------------------------------------------------- evaluate
def _label(specs: list[str]) -> list[str]:
    names = []
    for sp in specs:
        path, forced = split_spec(sp)
        names.append((TORCH_PREFIX if forced else "") + os.path.basename(os.path.normpath(path)))
    paths = specs
    return [n if names.count(n) == 1 else p for n, p in zip(names, paths)]


def evaluate(models: list[str | None], options: EvalOptions | None = None) -> EvalResult:
    """Score MODELS against one reference on the same token ids; see the module docstring."""
    o = options or EvalOptions()
    t_start = time.perf_counter()
    from ..models.bundled import bundled_path
    paths = [normalize_spec(m) if m is not None else bundled_path() for m in (models or [None])]
    for p in paths:
        if not os.path.exists(split_spec(p)[0]):
            raise QuantkitError("no such file or directory", p, "give a .gguf file or a Hugging Face model directory")
    n_threads = o.n_threads or max(1, os.cpu_count() or 1)
    cache_limit = eval_cache.max_bytes(o.cache_max)   # a bad size fails before the long run
    use_cache = o.cache and cache_limit > 0

    from .classify import evaluate_classifiers, is_encoder_dir
    ref_spec = normalize_spec(o.ref) if o.ref is not None else None
    encoders = [is_encoder_dir(split_spec(p)[0]) for p in paths + ([ref_spec] if ref_spec else [])]
    if any(encoders):
        if not all(encoders):
            odd = next(p for p, e in zip(paths + [ref_spec], encoders) if not e)
            raise QuantkitError("cannot score encoder classifiers and language models in one run", odd,
                                "evaluate classifiers (task accuracy) and language models (perplexity) separately")
        return evaluate_classifiers([split_spec(p)[0] for p in paths], ref_spec and split_spec(ref_spec)[0], o,
                                    n_threads)

    text_path = o.text or default_text()
    try:
        with open(text_path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise QuantkitError(f"cannot read the text ({e.strerror})", text_path) from None
    except UnicodeDecodeError:
        raise QuantkitError("the text is not UTF-8", text_path) from None

    facts = {p: describe(p) for p in dict.fromkeys(paths)}
    if o.ref is not None:
        ref_path = normalize_spec(o.ref)
        if not os.path.exists(split_spec(ref_path)[0]):
            raise QuantkitError("no such reference model", ref_path)
        ref_how = "given (--ref)"
    else:
        first = facts[paths[0]]
        if first.runtime == "torch" or first.all_f32:
            ref_path, ref_how = paths[0], "the first model (already float32)" if first.all_f32 else \
                "the first model in float32 (torch)"
        else:
            ref_path = f32_reference(split_spec(paths[0])[0], n_threads, o.show_progress)
            ref_how = f"F32 dequantization of {os.path.basename(paths[0])} (llama.cpp)"
    ref_facts = facts.get(ref_path) or describe(ref_path)
    for p in paths:
        check_same_vocab(ref_facts, facts[p])
    ref_kind = ref_facts.runtime

    # one tokenization, by the reference's tokenizer
    # a GGUF's tokenizer is read by llama.cpp (vocabulary only), whichever runtime scores it
    ref_file = split_spec(ref_path)[0]
    tok_rt = open_scorer(ref_path, o.n_ctx, n_threads, vocab_only=True) if os.path.isfile(ref_file) else None
    ref_scorer = None
    if tok_rt is None:
        ref_scorer = open_scorer(ref_path, o.n_ctx, n_threads)
        tok_rt = ref_scorer
    try:
        add_bos = tok_rt.add_bos()
        chunks = make_chunks(tok_rt.tokenize, text, o.n_ctx, o.n_chunks, add_bos, tok_rt.bos_id(), text_path)
        ref_vocab_n = tok_rt.n_vocab if ref_scorer is not None else None
    finally:
        if ref_scorer is None:
            tok_rt.close()
    first = o.n_ctx // 2
    n_scored = o.n_ctx - 1 - first

    # the reference pass: log-softmax of the scored rows, once per chunk, memory-mapped on disk
    ref_digest = model_digest(ref_file)
    rt_version = runtime_version(ref_kind)
    cache_dir = os.path.join(_cache_root(), "logprobs") if use_cache else tempfile.mkdtemp(prefix="quantkit-eval-")
    os.makedirs(cache_dir, exist_ok=True)
    ref_files = []
    for c in chunks:
        h = hashlib.sha256(f"{ref_digest}|{ref_kind}|{rt_version}|{o.n_ctx}|{first}|".encode())
        h.update(np.asarray(c, dtype=np.int32).tobytes())
        ref_files.append(os.path.join(cache_dir, f"{h.hexdigest()[:32]}.npy"))
    missing = [i for i, f in enumerate(ref_files) if not os.path.exists(f)]
    for i, f in enumerate(ref_files):
        if i not in missing:
            eval_cache.touch(f)
    timings: dict[str, Any] = {"ref_cached_chunks": len(chunks) - len(missing)}
    total_passes = len(missing) + sum(len(chunks) for p in dict.fromkeys(paths) if p != ref_path)
    bar = progress(total=total_passes, desc="eval", unit="pass") if o.show_progress else None
    rows: list[dict[str, Any]] = []
    try:
        t0 = time.perf_counter()
        if missing:
            if ref_scorer is None:
                ref_scorer = open_scorer(ref_path, o.n_ctx, n_threads)
            ref_vocab_n = ref_scorer.n_vocab
            for i in missing:
                if bar:
                    bar.set_description(f"eval {os.path.basename(ref_path)} (reference)")
                logits = ref_scorer.scored_logits(chunks[i], first)
                with atomic_output(ref_files[i]) as tmp:
                    mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=logits.shape)
                    metrics.log_softmax_into(logits, mm)
                    mm.flush()
                    del mm
                del logits
                if bar:
                    bar.update(1)
        if ref_scorer is not None:
            ref_load_s = ref_scorer.load_s
            ref_scorer.close()
            ref_scorer = None
        else:
            ref_load_s = None
        timings["ref_pass_s"] = time.perf_counter() - t0

        ref_scores = metrics.Scores()
        for i, c in enumerate(chunks):
            lp = _load_ref(ref_files[i])
            if ref_vocab_n is None:
                ref_vocab_n = lp.shape[1]
            metrics.score_reference(lp, c[first + 1:], ref_scores)
            del lp
        ref_row = {"path": ref_path, "runtime": ref_kind, "is_reference": True,
                   "eval_s": timings["ref_pass_s"] if missing else 0.0, "eval_load_s": ref_load_s,
                   **metrics.summarize(ref_scores)}
        rows.append(ref_row)

        for p in dict.fromkeys(paths):
            if p == ref_path:
                continue
            t0 = time.perf_counter()
            sc = open_scorer(p, o.n_ctx, n_threads)
            try:
                if sc.n_vocab != ref_vocab_n:
                    raise QuantkitError(f"output has {sc.n_vocab} logits per token, the reference {ref_vocab_n}", p,
                                        "models are scored on the same token ids; compare models that share a vocabulary")
                if bar:
                    bar.set_description(f"eval {os.path.basename(p)}")
                sc_scores = metrics.Scores()
                for i, c in enumerate(chunks):
                    logits = sc.scored_logits(c, first)
                    lp = _load_ref(ref_files[i])
                    metrics.score_against_reference(logits, lp, c[first + 1:], sc_scores)
                    del lp, logits
                    if bar:
                        bar.update(1)
                load_s = sc.load_s
            finally:
                sc.close()
            rows.append({"path": p, "runtime": facts[p].runtime, "is_reference": False,
                         "eval_s": time.perf_counter() - t0, "eval_load_s": load_s, **metrics.summarize(sc_scores)})
    finally:
        if bar:
            bar.close()
        if ref_scorer is not None:
            ref_scorer.close()
        if not use_cache:
            shutil.rmtree(cache_dir, ignore_errors=True)
        pruned = eval_cache.prune(_cache_root(), cache_limit) if o.cache else None
    timings["quality_s"] = time.perf_counter() - t_start
    timings["eval_process_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    # sizes, then speed and memory per model in a fresh process
    all_facts = {**facts, ref_path: ref_facts}
    for r, label in zip(rows, _label([r["path"] for r in rows])):
        f = all_facts[r["path"]]
        r["name"] = label
        r.update({"file_bytes": f.file_bytes, "n_params": f.n_params, "types": f.types,
                  "bits_per_weight": 8 * f.file_bytes / f.n_params if f.n_params else None,
                  "bits_per_weight_linear": 8 * f.linear_bytes / f.linear_params if f.linear_params else None})
    if o.speed:
        probe_tokens = chunks[0][:min(o.n_prompt, o.n_ctx)]
        it = progress(rows, desc="speed", unit="model") if o.show_progress else rows
        for r in it:
            r["speed"] = run_probe(r["path"], probe_tokens, o.n_gen, o.speed_runs, n_threads)
    timings["total_s"] = time.perf_counter() - t_start

    meta = {
        "protocol": (f"{PROTOCOL}: {len(chunks)} chunk(s) of {'BOS + ' if add_bos else ''}"
                     f"{o.n_ctx - int(add_bos)} text tokens (n_ctx {o.n_ctx}), each from an empty cache; "
                     f"the second half scored: predictions at positions {first}..{o.n_ctx - 2}, "
                     f"{n_scored} per chunk, {n_scored * len(chunks)} in all"),
        "reference": ref_path, "reference_how": ref_how, "reference_runtime": f"{ref_kind} ({rt_version})",
        "tokenizer": f"the reference's ({ref_kind}); the same token ids for every model",
        "text": os.path.abspath(text_path), "n_chunks": len(chunks), "n_ctx": o.n_ctx,
        "n_scored_per_chunk": n_scored, "threads": n_threads,
        "metrics": {"kld": "KL(reference || model) per scored position, natural log; mean, median, 99th percentile",
                    "top1_agreement": "share of positions where the model's most likely token is the reference's "
                                      "(llama.cpp's 'Same top p')",
                    "delta_p": "p_model(true token) - p_reference(true token): mean and RMS (llama.cpp's Δp)"},
        "speed": (f"fresh subprocess per model: load; prompt processing of {min(o.n_prompt, o.n_ctx)} tokens in one "
                  f"batch; {o.n_gen} greedy generation steps; median of {o.speed_runs} runs after one warm-up; "
                  f"{n_threads} thread(s); peak RSS = VmHWM of that process (Python and runtime included; "
                  f"RSS before loading stated)") if o.speed else None,
        "timings": timings,
        "cache": cache_dir if use_cache else None,
        "cache_pruned": pruned,
        "machine": machine_info(n_threads),
    }
    return EvalResult(rows, meta)


# ------------------------------------------------------------------------- ladder
# A rung is a recipe (quantkit.recipe) of a GGUF file type: llama.cpp's own round-to-nearest
# ("q4_0"), or the same type with GPTQ-compensated weights ("q4_0+gptq": quant.gguf_gptq,
# calibrated on a text). Rung files keep the name "TYPE-gptq.gguf", so cached rungs stay valid.
GPTQ_SUFFIX = "-gptq"
DEFAULT_LADDER = ["f16", "q8_0", "q5_0", "q4_1", "q4_0", "q4_0+gptq"]
LADDER_KQUANTS = ["q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k"]
# GPTQ rungs calibrate as recipe.LADDER_CALIBRATION says: few tokens of a shipped WikiText-2
# *valid* excerpt (the eval scores *test* text).
CALIB_TEXT = calib_text_path(ladder=True)
DEFAULT_CALIB_SAMPLES = LADDER_CALIBRATION.nsamples
DEFAULT_CALIB_SEQLEN = LADDER_CALIBRATION.seqlen
_GPTQ_RUNG_VERSION = "2"                 # bump when the GPTQ rung's recipe changes: cached rungs are rebuilt


def parse_rung(name: str, warn: bool = True) -> tuple[str, str]:
    """"q4_0" / "gguf:q4_0" -> ("q4_0", "rtn"); "q4_0+gptq" -> ("q4_0", "gptq"); the old
    "q4_0-gptq" too, with a note on stderr (unless `warn` is False)."""
    r = parse_recipe(name, warn=warn)
    if r.format != "gguf":
        raise QuantkitError(f"ladder rung '{name}' is {r.format}, not a GGUF type", hint=valid_spellings())
    return r.type, r.method


def rung_label(name: str) -> str:
    """"q4_0" -> "Q4_0 RTN", "q4_0+gptq" -> "Q4_0 GPTQ", "f16" -> "F16"."""
    return parse_recipe(name, warn=False).label()


def ladder_types(requested: list[str] | None = None) -> list[str]:
    """The rungs to build: REQUESTED (validated, lower-cased) or the default ladder (F16, Q8_0,
    Q5_0, Q4_1, Q4_0 RTN, Q4_0 GPTQ and the K-quant mixes quantkit encodes)."""
    from ..quant.gguf_export import supported_file_types
    ok = supported_file_types()
    if not requested:
        return DEFAULT_LADDER + [t for t in LADDER_KQUANTS if t in ok]
    out = []
    for t in requested:
        try:
            r = parse_recipe(t)
        except QuantkitError as e:
            raise QuantkitError(f"unknown or unsupported ladder type: {e}") from None
        if r.format != "gguf" or r.type not in ok:
            raise QuantkitError(f"unknown or unsupported ladder type(s): {t}",
                                hint="choose from " + ", ".join(ok) + "; add +gptq for GPTQ, e.g. q4_0+gptq")
        if r.spelling(short=True) not in out:
            out.append(r.spelling(short=True))
    return out


@dataclass
class Rung:
    name: str            # "q4_0-gptq"
    file_type: str       # "q4_0"
    method: str          # "rtn" | "gptq"
    label: str           # "Q4_0 GPTQ"
    path: str
    seconds: float       # time to build it now (0 when re-used from the cache)
    reused: bool
    calibration: str | None = None   # GPTQ: "16 x 256 tokens of FILE"


@dataclass
class GPTQCalibration:
    text: str | None = None           # None: the shipped WikiText-2 valid excerpt (CALIB_TEXT)
    nsamples: int = DEFAULT_CALIB_SAMPLES
    seqlen: int = DEFAULT_CALIB_SEQLEN

    @property
    def path(self) -> str:
        return os.path.abspath(self.text) if self.text else CALIB_TEXT

    def check(self) -> None:
        if self.nsamples < 1 or self.seqlen < 2:
            raise QuantkitError(f"GPTQ calibration needs at least 1 sample of at least 2 tokens "
                                f"(got {self.nsamples} x {self.seqlen})", hint="--calib-samples N --calib-seqlen L")
        if not os.path.isfile(self.path):
            raise QuantkitError("no such calibration file", self.path, "give --calib FILE (any UTF-8 text)")

    def describe(self) -> str:
        return f"{self.nsamples} x {self.seqlen} tokens of {self.path}"

    def key(self) -> str:
        """What a cached GPTQ rung depends on besides the source and type: the text's bytes,
        nsamples, seqlen and the recipe's version."""
        h = hashlib.sha256(f"{_sha256_file(self.path)}|{self.nsamples}|{self.seqlen}|v{_GPTQ_RUNG_VERSION}".encode())
        return h.hexdigest()[:12]


def build_rungs(model: str | None, types: list[str], out_dir: str | None = None, show_progress: bool = True,
                calibration: GPTQCalibration | None = None, stem: str | None = None) -> list[Rung]:
    """Quantize MODEL to each rung: RTN rungs with quantkit's own exporter (llama.cpp-exact), GPTQ
    rungs (name + "-gptq") with quant.gguf_gptq, calibrated as `calibration` says. In quantkit's
    cache (a folder per source digest; GPTQ rungs in a sub-folder per calibration) an existing
    rung is re-used, so a rerun is instant; in a folder the user names, every rung is written
    afresh."""
    from ..models.bundled import bundled_path
    from ..models.open import open_model
    from ..quant.gguf_export import export_gguf
    src_path = os.path.abspath(os.fspath(model)) if model is not None else bundled_path()
    parsed = [parse_rung(t) for t in types]
    cal = calibration or GPTQCalibration()
    if any(m == "gptq" for _, m in parsed):
        cal.check()
    reuse = out_dir is None
    if out_dir is None:
        out_dir = os.path.join(_cache_root(), "ladder", model_digest(src_path)[:16])
    os.makedirs(out_dir, exist_ok=True)
    stem = stem or os.path.splitext(os.path.basename(os.path.normpath(src_path)))[0]
    rungs = []
    for (ft, method) in parsed:
        name = ft + (GPTQ_SUFFIX if method == "gptq" else "")
        where = os.path.join(out_dir, f"gptq-{cal.key()}") if (method == "gptq" and reuse) else out_dir
        out = os.path.join(where, f"{stem}-{name}.gguf")
        reused = reuse and os.path.exists(out)
        t0 = time.perf_counter()
        if not reused:
            os.makedirs(where, exist_ok=True)
            if method == "gptq":
                from .. import api
                if show_progress:
                    print(f"{rung_label(name)}: GPTQ on {cal.describe()}", file=sys.stderr, flush=True)
                api.quantize(src_path, out, format=f"gguf:{ft}", method="gptq", calib=cal.path,
                             nsamples=cal.nsamples, seqlen=cal.seqlen, show_progress=show_progress)
            else:
                with open_model(src_path) as src:
                    export_gguf(src, out, ft, show_progress=show_progress)
        elif reuse:
            eval_cache.touch(out, keep_mtime=True)
        rungs.append(Rung(name, ft, method, rung_label(name), out, 0.0 if reused else time.perf_counter() - t0,
                          reused, cal.describe() if method == "gptq" else None))
    return rungs


def build_ladder(model: str | None, types: list[str], out_dir: str | None = None,
                 show_progress: bool = True, calibration: GPTQCalibration | None = None) -> list[str]:
    """The rungs' paths (see build_rungs)."""
    return [r.path for r in build_rungs(model, types, out_dir, show_progress, calibration)]


def label_ladder(result: EvalResult, rungs: list[Rung], calibration: GPTQCalibration | None = None) -> EvalResult:
    """Mark each row with its rung (method shown: "Q4_0 RTN", "Q4_0 GPTQ") and state the GPTQ
    calibration in the result's meta."""
    by_path = {os.path.abspath(r.path): r for r in rungs}
    for row in result.rows:
        r = by_path.get(split_spec(row["path"])[0])
        if r is not None:
            row.update(rung=r.label, method=r.method, file_type=r.file_type, build_s=r.seconds,
                       build_reused=r.reused, calibration=r.calibration)
        else:
            row.setdefault("rung", "source" if not row.get("is_reference") else "reference")
            row.setdefault("method", None)
    gptq = [r for r in rungs if r.method == "gptq"]
    result.meta["ladder"] = {
        "rungs": [r.label for r in rungs],
        "rtn": "llama.cpp's round-to-nearest (quantkit's exporter, byte-exact with llama-quantize)",
        "gptq": (f"GPTQ onto the same llama.cpp types, calibrated on {gptq[0].calibration} "
                 f"(never the scored text)") if gptq else None,
        "reused": [r.label for r in rungs if r.reused],
    }
    return result


# ------------------------------------------------------------------------- probe entry point
def _main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "probe":
        with open(argv[1]) as f:
            a = json.load(f)
        try:
            if a.get("kind") == "classifier":
                from .classify import probe_classifier
                res = probe_classifier(a["path"], a["tokens"], a["runs"], a["n_threads"])
            else:
                res = probe(a["path"], a["tokens"], a["n_gen"], a["runs"], a["n_threads"])
        except QuantkitError as e:
            print(str(e), file=sys.stderr)
            return 2
        print(json.dumps(res))
        return 0
    print("usage: python -m quantkit.eval.evaluate probe ARGS.json", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))


__all__ = ["EvalOptions", "EvalResult", "evaluate", "build_ladder", "build_rungs", "ladder_types", "label_ladder",
           "GPTQCalibration", "Rung", "describe"]
