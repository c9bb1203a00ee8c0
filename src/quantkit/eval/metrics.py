"""Quality metrics over next-token distributions, as llama.cpp's `llama-perplexity` computes them.

Pure numpy on [rows, n_vocab] float32 logits, processed a few rows at a time so that a chunk of
Gemma-3's 262144-entry rows never needs a second full-size temporary. Sums over the vocabulary
run in float64, as llama.cpp's `log_softmax` does (`double sum_exp`), so perplexities agree with
llama.cpp's to ~1e-7 relative and the KL divergence of identical logits is exactly 0.

Per scored position the accumulators keep: negative log-likelihood of the true next token,
KL(reference || model), whether the two argmax tokens agree, and the probability each gives the
true token. `summarize` turns them into the numbers `quantkit eval` reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

ROW_BLOCK = 16  # rows per step: 16 x 262144 x 4 B = 16 MB of temporaries


def logsumexp(xb: np.ndarray) -> np.ndarray:
    """[b, V] float32 -> [b, 1] float64: max + log(sum(exp(x - max))), the sum in float64."""
    m = xb.max(axis=1, keepdims=True)
    s = np.exp(xb - m).sum(axis=1, dtype=np.float64, keepdims=True)
    return m.astype(np.float64) + np.log(s)


def log_softmax_into(logits: np.ndarray, out: np.ndarray) -> None:
    """out[:] = log_softmax(logits) row by row (float32 out; the normaliser in float64)."""
    if logits.shape != out.shape:
        raise ValueError(f"shape mismatch {logits.shape} vs {out.shape}")
    for i in range(0, logits.shape[0], ROW_BLOCK):
        xb = logits[i:i + ROW_BLOCK]
        out[i:i + ROW_BLOCK] = xb - logsumexp(xb)


@dataclass
class Scores:
    """Per-position values, appended chunk by chunk."""
    nll: list[np.ndarray] = field(default_factory=list)         # -log p_model(true token)
    kld: list[np.ndarray] = field(default_factory=list)         # KL(ref || model)
    same_top: list[np.ndarray] = field(default_factory=list)    # argmax model == argmax ref
    p_model: list[np.ndarray] = field(default_factory=list)     # p_model(true token)
    p_ref: list[np.ndarray] = field(default_factory=list)       # p_ref(true token)

    def cat(self, name: str) -> np.ndarray:
        parts = getattr(self, name)
        return np.concatenate(parts) if parts else np.zeros(0)


def score_against_reference(logits: np.ndarray, ref_logp: np.ndarray, targets: np.ndarray,
                            scores: Scores) -> None:
    """One chunk: model logits [n, V] and the reference's log-probabilities [n, V] (float32,
    e.g. a memory-mapped cache) for the same n positions, whose true next tokens are `targets`."""
    n, v = logits.shape
    if ref_logp.shape != (n, v):
        raise ValueError(f"reference log-probabilities {ref_logp.shape} do not match logits {logits.shape}")
    targets = np.asarray(targets, dtype=np.int64)
    nll = np.empty(n)
    kld = np.empty(n)
    same = np.empty(n, dtype=bool)
    p_model = np.empty(n)
    p_ref = np.empty(n)
    lq = np.empty((min(ROW_BLOCK, n), v), dtype=np.float32)
    for i in range(0, n, ROW_BLOCK):
        j = min(i + ROW_BLOCK, n)
        xb = logits[i:j]
        lp = np.asarray(ref_logp[i:j])
        rows = np.arange(j - i)
        t = targets[i:j]
        lse = logsumexp(xb)[:, 0]
        q = lq[:j - i]
        np.subtract(xb, lse[:, None], out=q, casting="unsafe")
        nll[i:j] = lse - xb[rows, t].astype(np.float64)
        p = np.exp(lp)
        kld[i:j] = (p * (lp - q)).sum(axis=1, dtype=np.float64)
        same[i:j] = xb.argmax(axis=1) == lp.argmax(axis=1)
        p_model[i:j] = np.exp(-nll[i:j])
        p_ref[i:j] = np.exp(lp[rows, t].astype(np.float64))
    scores.nll.append(nll)
    scores.kld.append(kld)
    scores.same_top.append(same)
    scores.p_model.append(p_model)
    scores.p_ref.append(p_ref)


def score_reference(ref_logp: np.ndarray, targets: np.ndarray, scores: Scores) -> None:
    """The reference's own row: its perplexity from the cached log-probabilities; KLD 0."""
    n = ref_logp.shape[0]
    t = np.asarray(targets, dtype=np.int64)
    lp_t = np.asarray(ref_logp[np.arange(n), t], dtype=np.float64)
    scores.nll.append(-lp_t)
    scores.kld.append(np.zeros(n))
    scores.same_top.append(np.ones(n, dtype=bool))
    scores.p_model.append(np.exp(lp_t))
    scores.p_ref.append(np.exp(lp_t))


def summarize(scores: Scores) -> dict[str, float]:
    """Perplexity (with llama.cpp's standard error), KL divergence statistics, top-1 agreement
    (llama.cpp's "Same top p") and the change of the true token's probability (llama.cpp's Δp)."""
    nll = scores.cat("nll")
    n = int(nll.size)
    if n == 0:
        raise ValueError("no scored positions")
    mean_nll = float(nll.mean())
    # llama.cpp: sqrt((<nll^2> - <nll>^2) / (n - 1)), propagated to the perplexity
    var = float((nll ** 2).mean() - mean_nll ** 2)
    nll_err = (max(var, 0.0) / (n - 1)) ** 0.5 if n > 1 else float("nan")
    ppl = float(np.exp(mean_nll))
    kld = scores.cat("kld")
    same = scores.cat("same_top")
    dp = scores.cat("p_model") - scores.cat("p_ref")
    return {
        "n_scored": n,
        "nll": mean_nll,
        "ppl": ppl,
        "ppl_stderr": ppl * nll_err,
        "kld_mean": float(kld.mean()),
        "kld_stderr": float(kld.std(ddof=1) / n ** 0.5) if n > 1 else float("nan"),
        "kld_median": float(np.median(kld)),
        "kld_p99": float(np.percentile(kld, 99)),
        "kld_max": float(kld.max()),
        "top1_agreement": float(same.mean()),
        "delta_p_mean": float(dp.mean()),
        "delta_p_rms": float(np.sqrt((dp ** 2).mean())),
    }


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For (size, kld) pairs, True where no other point is at least as good in both and better in one."""
    out = []
    for i, (s, k) in enumerate(points):
        dominated = any((s2 <= s and k2 <= k) and (s2 < s or k2 < k) for j, (s2, k2) in enumerate(points) if j != i)
        out.append(not dominated)
    return out


def recall_at_k(ref, got, k: int = 10) -> float:
    """Retrieval agreement of two embeddings of the same items (torch tensors [n, d], rows
    normalised): mean overlap of each item's top-k neighbours, itself excluded."""
    def topk(e):
        s = e @ e.t()
        s.fill_diagonal_(-2)
        return s.topk(k, dim=1).indices
    a, b = topk(ref), topk(got)
    return sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, b)) / (k * len(a))
