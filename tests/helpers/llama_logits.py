"""Logits of a GGUF in llama.cpp over fixed chunks of a text, and the KL divergence between two
sets of them: what the GGUF quality tests compare files with.

    ref = chunk_logits(f32_path, text)        # float32 [tokens, vocab], 3 chunks of BOS + 255
    kld(ref, chunk_logits(q_path, text))      # mean KL(ref || q) per token
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def chunk_logits(path: str | Path, text: str, chunks: int = 3) -> np.ndarray:
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, logits_all=True, verbose=False,
                          n_threads=2, seed=0, type_k=0, type_v=0)
    try:
        out = []
        ids = llm.tokenize(text.encode(), add_bos=False)
        for i in range(chunks):
            chunk = [llm.token_bos()] + ids[i * 255:(i + 1) * 255]
            llm.reset()
            llm.eval(chunk)
            out.append(np.array(llm.scores[:len(chunk)], dtype=np.float32))
        return np.concatenate(out)
    finally:
        llm.close()


def log_softmax(a: np.ndarray) -> np.ndarray:
    a = a - a.max(-1, keepdims=True)
    return a - np.log(np.exp(a).sum(-1, keepdims=True))


def kld(ref: np.ndarray, x: np.ndarray) -> float:
    """Mean over tokens of KL(softmax(ref) || softmax(x)), from logits."""
    p, q = log_softmax(ref), log_softmax(x)
    return float((np.exp(p) * (p - q)).sum(-1).mean())


def greedy_tokens(path: str | Path, prompt: bytes = b"Robert Boulter is an English", n: int = 6) -> list[int]:
    """n greedy tokens llama.cpp generates from a GGUF after `prompt` (BOS first): the
    file loads and runs."""
    import llama_cpp
    llm = llama_cpp.Llama(str(path), n_ctx=128, verbose=False, n_threads=1)
    try:
        toks: list[int] = []
        for t in llm.generate(llm.tokenize(prompt, add_bos=True), temp=0):
            toks.append(t)
            if len(toks) == n:
                break
        assert all(0 <= t < llm.n_vocab() for t in toks)
        return toks
    finally:
        llm.close()
