"""Run what quantkit writes in the real runtimes. llama.cpp through llama-cpp-python."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

from ..util.errors import QuantkitError


@contextlib.contextmanager
def _quiet_stderr():
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
            with _quiet_stderr():
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
        with _quiet_stderr():
            llm.eval(ids)
        t_prompt = time.perf_counter() - t0
        out: list[int] = []
        t1 = time.perf_counter()
        eos = llm.token_eos()
        with _quiet_stderr():
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
