"""The reference's log-probabilities in 2 bytes an entry, for moving them between machines (Ray's
object store, a shared cache directory) with a stated bound on the KL divergence error they add.

llama-perplexity's KL base file (`--kl-divergence-base`) stores per scored position the row's
maximum logit and minimum log-probability (two floats) and every vocabulary entry as a uint16 on
a linear grid over the row's range: 2 bytes an entry, each log-probability within half a grid step
(range / 65535 / 2, about 3e-4 nats for a 40-nat range). This codec keeps the same grid and size
and adds, per position, the TOP_K largest log-probabilities and the true next token's
log-probability exactly (float32): 2 bytes an entry plus 8 + 8 TOP_K bytes a row (0.2% of a
262144-entry row). The exact entries carry most of the probability mass, so the KL error, which
the grid adds in proportion to the mass it rounds, shrinks with the tail's mass; the perplexity,
top-1 agreement and Δp of the reference read only exact values and are unchanged.

The bound (kld_error_bound): with lp the true log-probabilities, lp' = lp + δ the decoded ones
(δ = 0 on the exact entries, |δ| <= h = step/2 on the tail T) and lq the model's,
KL' - KL = Σ_T p [(e^δ - 1)(lp - lq) + e^δ δ], so with p <= p' e^h and |lp - lq| <= |lp' - lq| + h
  |KL' - KL| <= e^h Σ_T p' [(e^h - 1)(|lp' - lq| + h) + e^h h]       (per position),
computed from what the scorer holds. The run reports its mean over positions, which bounds the
error of the reported mean KL divergence.
"""

from __future__ import annotations

import numpy as np

TOP_K = 32
LEVELS = 65535
ROW_BLOCK = 16


def encode(lp: np.ndarray, targets) -> dict[str, np.ndarray]:
    """[n, V] float32 log-probabilities and the n true next tokens -> the encoded chunk."""
    lp = np.asarray(lp, dtype=np.float32)
    n, v = lp.shape
    k = min(TOP_K, v)
    t = np.asarray(targets, dtype=np.int64)
    lo = np.empty(n, dtype=np.float32)
    step = np.empty(n, dtype=np.float32)
    codes = np.empty((n, v), dtype=np.uint16)
    top_idx = np.empty((n, k), dtype=np.int32)
    for i in range(0, n, ROW_BLOCK):
        xb = lp[i:i + ROW_BLOCK]
        mn, mx = xb.min(axis=1), xb.max(axis=1)
        s = np.where(mx > mn, (mx - mn) / LEVELS, 1.0).astype(np.float32)
        lo[i:i + ROW_BLOCK], step[i:i + ROW_BLOCK] = mn, s
        codes[i:i + ROW_BLOCK] = np.clip(np.rint((xb - mn[:, None]) / s[:, None]), 0, LEVELS)
        top_idx[i:i + ROW_BLOCK] = np.argpartition(-xb, k - 1, axis=1)[:, :k]
    rows = np.arange(n)[:, None]
    return {"lo": lo, "step": step, "codes": codes, "top_idx": top_idx,
            "top_val": lp[rows, top_idx].astype(np.float32), "target_val": lp[np.arange(n), t].astype(np.float32),
            "targets": t.astype(np.int32)}


def decode(enc: dict[str, np.ndarray], i: int = 0, j: int | None = None) -> np.ndarray:
    """Rows i..j of the encoded chunk as float32 log-probabilities (exact entries restored)."""
    j = enc["codes"].shape[0] if j is None else j
    out = enc["codes"][i:j].astype(np.float32)
    out *= enc["step"][i:j, None]
    out += enc["lo"][i:j, None]
    rows = np.arange(j - i)[:, None]
    out[rows, enc["top_idx"][i:j]] = enc["top_val"][i:j]
    out[np.arange(j - i), enc["targets"][i:j]] = enc["target_val"][i:j]
    return out


def half_step(enc: dict[str, np.ndarray]) -> np.ndarray:
    """Per row, the largest |decoded - true| of a tail entry: half a grid step, plus float32
    rounding of lo + code * step."""
    lo, step = enc["lo"].astype(np.float64), enc["step"].astype(np.float64)
    return 0.5 * step + 4 * np.finfo(np.float32).eps * (np.abs(lo) + step * LEVELS)


def kld_error_bound(enc: dict[str, np.ndarray], i: int, lp_dec: np.ndarray, lq: np.ndarray) -> np.ndarray:
    """Per row of the block starting at row i: the bound on |KL' - KL| (module docstring), from the
    decoded reference rows lp_dec and the model's log-probabilities lq."""
    n = lp_dec.shape[0]
    h = half_step(enc)[i:i + n, None]
    tail = np.ones(lp_dec.shape, dtype=bool)
    rows = np.arange(n)[:, None]
    tail[rows, enc["top_idx"][i:i + n]] = False
    tail[np.arange(n), enc["targets"][i:i + n]] = False
    p = np.exp(lp_dec.astype(np.float64)) * tail
    term = (np.expm1(h) * (np.abs(lp_dec.astype(np.float64) - lq) + h) + np.exp(h) * h)
    return np.exp(h[:, 0]) * (p * term).sum(axis=1)


def nbytes(enc: dict[str, np.ndarray]) -> int:
    return int(sum(a.nbytes for a in enc.values()))


def save(enc: dict[str, np.ndarray], path: str) -> None:
    """To an uncompressed .npz (path is the temporary name of an atomic output)."""
    with open(path, "wb") as f:
        np.savez(f, **enc)


def load(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}
