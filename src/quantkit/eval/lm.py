"""Language models scored against one reference: perplexity, KL divergence, top-1 agreement.

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

Sizes come from the headers (eval.facts), speed and memory from eval.speed.
"""

from __future__ import annotations

import errno
import hashlib
import os
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..runtimes import Runtime, normalize_spec, open_runtime, runtime_version, split_spec
from ..util.atomic import atomic_output
from ..util.errors import QuantkitError
from ..util.finite import check_logits
from ..util.machine import machine_info
from ..util.progress import progress
from . import cache as eval_cache
from . import metrics
from .cache import cache_root, model_digest
from .facts import ModelFacts, check_same_vocab, describe
from .options import EvalOptions
from .results import EvalResult, ModelRow, model_labels
from .speed import run_probe

PROTOCOL = "llama.cpp perplexity protocol"


def f32_reference(path: str, n_threads: int, show_progress: bool = True) -> str:
    """The F32 dequantization of a GGUF, made once into quantkit's cache by llama.cpp's own
    quantizer (runtimes.llama_cpp.dequantize_to_f32)."""
    from ..runtimes.llama_cpp import dequantize_to_f32
    digest = model_digest(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    out = os.path.join(cache_root(), "refs", digest[:16], f"{stem}-f32.gguf")
    if os.path.exists(out):
        eval_cache.touch(out, keep_mtime=True)
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    bar = progress(total=1, desc="F32 reference (dequantize)", unit="file") if show_progress else None
    with atomic_output(out) as tmp:
        dequantize_to_f32(path, tmp, n_threads)
    eval_cache.touch(out, keep_mtime=True)
    if bar:
        bar.update(1)
        bar.close()
    return out


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


def load_ref_chunk(path: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise QuantkitError("a cached reference chunk disappeared during the run (pruned by another quantkit eval?)",
                            path, "run again, or give a larger --cache-max") from None


def read_text(text_path: str) -> str:
    try:
        with open(text_path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise QuantkitError(f"cannot read the text ({e.strerror})", text_path) from None
    except UnicodeDecodeError:
        raise QuantkitError("the text is not UTF-8", text_path) from None


# ------------------------------------------------------------------------- one run
@dataclass
class Reference:
    path: str            # a spec ("torch:" kept)
    how: str             # how it was chosen, for the meta
    facts: ModelFacts

    @property
    def kind(self) -> str:
        return self.facts.runtime


@dataclass
class Chunks:
    ids: list[list[int]]    # each n_ctx token ids, BOS first when the vocabulary adds one
    add_bos: bool
    first: int              # the first scored position: n_ctx // 2
    files: list[str]        # the reference's log-softmax of each chunk, cached on disk
    missing: list[int]      # chunks whose file is still to be written


def pick_reference(paths: list[str], facts: dict[str, ModelFacts], o: EvalOptions, n_threads: int) -> Reference:
    """--ref, else the first model where it is float32 (or runs in torch), else the F32
    dequantization of the first model; every model's vocabulary must be the reference's."""
    if o.ref is not None:
        path = normalize_ref(o.ref)
        how = "given (--ref)"
    else:
        first = facts[paths[0]]
        if first.runtime == "torch" or first.all_f32:
            path, how = paths[0], ("the first model (already float32)" if first.all_f32 else
                                   "the first model in float32 (torch)")
        else:
            path = f32_reference(split_spec(paths[0])[0], n_threads, o.show_progress)
            how = f"F32 dequantization of {os.path.basename(paths[0])} (llama.cpp)"
    ref = Reference(path, how, facts.get(path) or describe(path))
    for p in paths:
        check_same_vocab(ref.facts, facts[p])
    return ref


def normalize_ref(spec) -> str:
    path = normalize_spec(spec)
    if not os.path.exists(split_spec(path)[0]):
        raise QuantkitError("no such reference model", path)
    return path


def tokenize_chunks(ref: Reference, text: str, text_path: str, o: EvalOptions,
                    n_threads: int) -> tuple[list[list[int]], bool, Runtime | None]:
    """One tokenization, by the reference's tokenizer: (chunks, add_bos, the reference's
    runtime where it had to be loaded whole for its tokenizer, else None). A GGUF's tokenizer is
    read by llama.cpp (vocabulary only), whichever runtime scores it."""
    if os.path.isfile(split_spec(ref.path)[0]):
        tok_rt, ref_rt = open_runtime(ref.path, o.n_ctx, n_threads, vocab_only=True), None
    else:
        tok_rt = ref_rt = open_runtime(ref.path, o.n_ctx, n_threads)
    try:
        add_bos = tok_rt.add_bos()
        chunks = make_chunks(tok_rt.tokenize, text, o.n_ctx, o.n_chunks, add_bos, tok_rt.bos_id(), text_path)
    except BaseException:
        tok_rt.close()
        raise
    if ref_rt is None:
        tok_rt.close()
    return chunks, add_bos, ref_rt


def reference_files(ref: Reference, ids: list[list[int]], n_ctx: int, first: int, cache_dir: str) -> list[str]:
    """The cache file of each chunk's reference log-softmax: keyed by the reference's digest,
    runtime (and its version), n_ctx, the first scored position and the chunk's token ids."""
    ref_digest = model_digest(split_spec(ref.path)[0])
    rt_version = runtime_version(ref.kind)
    files = []
    for c in ids:
        h = hashlib.sha256(f"{ref_digest}|{ref.kind}|{rt_version}|{n_ctx}|{first}|".encode())
        h.update(np.asarray(c, dtype=np.int32).tobytes())
        files.append(os.path.join(cache_dir, f"{h.hexdigest()[:32]}.npy"))
    return files


def reserve(path: str) -> None:
    """Give the (sparse) file at PATH its blocks now: a store through a memory map into a full
    disk is a SIGBUS that kills the process, a failed fallocate an OSError (ENOSPC) that
    atomic_output turns into its one line."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):      # a filesystem without fallocate
            return
        raise
    finally:
        os.close(fd)


def write_reference(ref_rt: Runtime, ch: Chunks, bar) -> None:
    """The reference pass: the log-softmax of the scored rows of each missing chunk, written
    memory-mapped to its cache file."""
    for i in ch.missing:
        if bar:
            bar.set_description(f"eval {os.path.basename(ref_rt.path)} (reference)")
        logits = ref_rt.scored_logits(ch.ids[i], ch.first)
        check_logits(logits, ref_rt.path, f"chunk {i + 1}")
        with atomic_output(ch.files[i]) as tmp:
            mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=logits.shape)
            reserve(tmp)
            metrics.log_softmax_into(logits, mm)
            mm.flush()
            del mm
        del logits
        if bar:
            bar.update(1)


def reference_row(ref: Reference, ch: Chunks, eval_s: float, load_s: float | None) -> tuple[ModelRow, int]:
    """The reference's own scores, read back from the cache, and its vocabulary size."""
    scores = metrics.Scores()
    n_vocab = 0
    for i, c in enumerate(ch.ids):
        lp = load_ref_chunk(ch.files[i])
        n_vocab = lp.shape[1]
        metrics.score_reference(lp, c[ch.first + 1:], scores)
        del lp
    row = ModelRow(path=ref.path, runtime=ref.kind, is_reference=True, eval_s=eval_s, eval_load_s=load_s,
                   **metrics.summarize(scores))
    return row, n_vocab


def score_model(spec: str, runtime: str, ch: Chunks, ref_vocab_n: int, o: EvalOptions, n_threads: int,
                bar) -> ModelRow:
    """One model's pass over every chunk, scored against the cached reference."""
    t0 = time.perf_counter()
    rt = open_runtime(spec, o.n_ctx, n_threads)
    try:
        if rt.n_vocab != ref_vocab_n:
            raise QuantkitError(f"output has {rt.n_vocab} logits per token, the reference {ref_vocab_n}", spec,
                                "models are scored on the same token ids; compare models that share a vocabulary")
        if bar:
            bar.set_description(f"eval {os.path.basename(spec)}")
        scores = metrics.Scores()
        for i, c in enumerate(ch.ids):
            logits = rt.scored_logits(c, ch.first)
            check_logits(logits, spec, f"chunk {i + 1}")
            lp = load_ref_chunk(ch.files[i])
            metrics.score_against_reference(logits, lp, c[ch.first + 1:], scores)
            del lp, logits
            if bar:
                bar.update(1)
        load_s = rt.load_s
    finally:
        rt.close()
    return ModelRow(path=spec, runtime=runtime, is_reference=False, eval_s=time.perf_counter() - t0,
                    eval_load_s=load_s, **metrics.summarize(scores))


def score_all(paths: list[str], facts: dict[str, ModelFacts], ref: Reference, ref_rt: Runtime | None,
              ch: Chunks, o: EvalOptions, n_threads: int, timings: dict[str, Any]) -> list[ModelRow]:
    """The reference pass (missing chunks only), then every other model against it."""
    others = [p for p in dict.fromkeys(paths) if p != ref.path]
    bar = progress(total=len(ch.missing) + len(others) * len(ch.ids), desc="eval", unit="pass") \
        if o.show_progress else None
    try:
        t0 = time.perf_counter()
        ref_load_s = None
        if ch.missing:
            ref_rt = ref_rt or open_runtime(ref.path, o.n_ctx, n_threads)
            write_reference(ref_rt, ch, bar)
        if ref_rt is not None:
            ref_load_s = ref_rt.load_s
            ref_rt.close()
            ref_rt = None
        timings["ref_pass_s"] = time.perf_counter() - t0
        ref_row, ref_vocab_n = reference_row(ref, ch, timings["ref_pass_s"] if ch.missing else 0.0, ref_load_s)
        rows = [ref_row]
        for p in others:
            rows.append(score_model(p, facts[p].runtime, ch, ref_vocab_n, o, n_threads, bar))
        return rows
    finally:
        if bar:
            bar.close()
        if ref_rt is not None:
            ref_rt.close()


def add_sizes(rows: list[ModelRow], facts: dict[str, ModelFacts]) -> None:
    for r, label in zip(rows, model_labels([r.path for r in rows])):
        f = facts[r.path]
        r.set_size(label, f.file_bytes, f.n_params, f.types, f.linear_params, f.linear_bytes)


def evaluate_lm(paths: list[str], o: EvalOptions, n_threads: int, cache_limit: int,
                t_start: float) -> EvalResult:
    """Score the language models PATHS (normalized specs) against one reference; see the module
    docstring. t_start: when the run began (the timings count from it)."""
    use_cache = o.cache and cache_limit > 0
    text_path = o.text or default_text()
    text = read_text(text_path)
    facts = {p: describe(p) for p in dict.fromkeys(paths)}
    ref = pick_reference(paths, facts, o, n_threads)
    ids, add_bos, ref_rt = tokenize_chunks(ref, text, text_path, o, n_threads)
    first = o.n_ctx // 2
    cache_dir = os.path.join(cache_root(), "logprobs") if use_cache else tempfile.mkdtemp(prefix="quantkit-eval-")
    os.makedirs(cache_dir, exist_ok=True)
    try:
        files = reference_files(ref, ids, o.n_ctx, first, cache_dir)
        ch = Chunks(ids, add_bos, first, files, [i for i, f in enumerate(files) if not os.path.exists(f)])
        for i, f in enumerate(files):
            if i not in ch.missing:
                eval_cache.touch(f)
        timings: dict[str, Any] = {"ref_cached_chunks": len(ids) - len(ch.missing)}
        rows = score_all(paths, facts, ref, ref_rt, ch, o, n_threads, timings)
    finally:
        if not use_cache:
            shutil.rmtree(cache_dir, ignore_errors=True)
        pruned = eval_cache.prune(cache_root(), cache_limit) if o.cache else None
    timings["quality_s"] = time.perf_counter() - t_start
    timings["eval_process_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    # sizes, then speed and memory per model in a fresh process
    add_sizes(rows, {**facts, ref.path: ref.facts})
    if o.speed:
        probe_tokens = ids[0][:min(o.n_prompt, o.n_ctx)]
        for r in (progress(rows, desc="speed", unit="model") if o.show_progress else rows):
            r.speed = run_probe(r.path, probe_tokens, o.n_gen, o.speed_runs, n_threads)
    timings["total_s"] = time.perf_counter() - t_start
    meta = lm_meta(ref, ch, text_path, o, n_threads, timings)
    meta.update(cache=cache_dir if use_cache else None, cache_pruned=pruned, machine=machine_info(n_threads))
    return EvalResult(rows, meta)


def lm_meta(ref: Reference, ch: Chunks, text_path: str, o: EvalOptions, n_threads: int,
            timings: dict[str, Any]) -> dict[str, Any]:
    n_chunks, n_scored = len(ch.ids), o.n_ctx - 1 - ch.first
    return {
        "protocol": (f"{PROTOCOL}: {n_chunks} chunk(s) of {'BOS + ' if ch.add_bos else ''}"
                     f"{o.n_ctx - int(ch.add_bos)} text tokens (n_ctx {o.n_ctx}), each from an empty cache; "
                     f"the second half scored: predictions at positions {ch.first}..{o.n_ctx - 2}, "
                     f"{n_scored} per chunk, {n_scored * n_chunks} in all"),
        "reference": ref.path, "reference_how": ref.how,
        "reference_runtime": f"{ref.kind} ({runtime_version(ref.kind)})",
        "tokenizer": f"the reference's ({ref.kind}); the same token ids for every model",
        "text": os.path.abspath(text_path), "n_chunks": n_chunks, "n_ctx": o.n_ctx,
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
    }
