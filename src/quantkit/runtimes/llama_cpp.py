"""llama.cpp through llama-cpp-python: LlamaCpp (load, tokenize, greedy generation) and
LlamaCppScorer, the `Runtime` that scores chunks with logits read from llama.cpp's own output
buffer (no copy) and only for the rows asked for (llama_batch.logits flags)."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import numpy as np

from ..util.errors import QuantkitError


@contextlib.contextmanager
def quiet_stderr():
    """llama.cpp logs to fd 2 from C; hide it unless QUANTKIT_VERBOSE is set."""
    if os.environ.get("QUANTKIT_VERBOSE"):
        yield
        return
    fd = os.dup(2)
    try:
        # llama-cpp-python's log callback prints to sys.stderr, which may not be fd 2 (pytest's capsys)
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)


@dataclass
class Generation:
    text: str
    tokens: list[int]
    load_s: float
    prompt_tokens: int
    prompt_tok_s: float
    gen_tok_s: float
    n_threads: int


class LlamaCpp:
    """A GGUF loaded in llama.cpp (CPU), for greedy generation and token ids."""

    def __init__(self, path: str, n_ctx: int = 512, n_threads: int | None = None, logits_all: bool = False,
                 n_batch: int | None = None, vocab_only: bool = False):
        try:
            import llama_cpp
        except ImportError:
            raise QuantkitError("llama-cpp-python is not installed", hint="run make test / make demo") from None
        self.path = path
        self.n_threads = n_threads or max(1, os.cpu_count() or 1)
        t0 = time.perf_counter()
        try:
            with quiet_stderr():
                self.llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=self.n_threads,
                                           n_threads_batch=self.n_threads, logits_all=logits_all,
                                           verbose=False, seed=0, vocab_only=vocab_only,
                                           # n_batch >= n_ctx: one llama_decode per chunk (quantkit eval)
                                           **({"n_batch": n_batch, "n_ubatch": n_batch} if n_batch else {}))
        except (ValueError, RuntimeError) as e:
            raise QuantkitError(f"llama.cpp could not load the model ({e})", path) from None
        self.load_s = time.perf_counter() - t0

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)

    def generate(self, prompt: str, max_tokens: int = 32) -> Generation:
        llm = self.llm
        ids = self.tokenize(prompt)
        llm.reset()
        t0 = time.perf_counter()
        with quiet_stderr():
            llm.eval(ids)
        t_prompt = time.perf_counter() - t0
        out: list[int] = []
        t1 = time.perf_counter()
        eos = llm.token_eos()
        with quiet_stderr():
            for _ in range(max_tokens):
                tok = int(llm.sample(temp=0.0, top_k=1))
                if tok == eos:
                    break
                out.append(tok)
                llm.eval([tok])
        t_gen = time.perf_counter() - t1
        text = llm.detokenize(out).decode("utf-8", errors="replace")
        return Generation(text=text, tokens=out, load_s=self.load_s, prompt_tokens=len(ids),
                          prompt_tok_s=len(ids) / t_prompt if t_prompt else 0.0,
                          gen_tok_s=len(out) / t_gen if t_gen and out else 0.0, n_threads=self.n_threads)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.llm.close()


class LlamaCppScorer:
    """llama.cpp through the low-level API: one llama_batch per chunk with logits requested only
    for the scored rows, read as a numpy view of llama.cpp's output buffer."""
    kind = "llama.cpp"

    def __init__(self, path: str, n_ctx: int, n_threads: int | None = None, vocab_only: bool = False):
        import llama_cpp

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


def dequantize_to_f32(path: str, out: str, n_threads: int) -> None:
    """Write the F32 dequantization of the GGUF at PATH to OUT with llama.cpp's own quantizer
    (llama_model_quantize, ftype ALL_F32, allow_requantize: every tensor dequantized to float32;
    the same bytes as `quantkit quantize --format gguf:f32`)."""
    import ctypes

    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = 0  # LLAMA_FTYPE_ALL_F32
    params.allow_requantize = True
    params.nthread = n_threads
    with quiet_stderr():
        rc = llama_cpp.llama_model_quantize(path.encode(), out.encode(), ctypes.byref(params))
    if rc != 0:
        raise QuantkitError(f"llama.cpp could not dequantize the model to F32 (code {rc})", path)
