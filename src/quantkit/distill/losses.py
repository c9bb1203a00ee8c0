"""Distillation losses: soft+hard labels (Hinton et al.), MiniLMv2 relations, embedding MSE.

Pure functions on tensors; the trainer only wires model outputs into them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100      # label of a teacher-labelled (augmented) example: no hard-label term


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
            temperature: float = 2.0, alpha: float = 0.5) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, gold).

    The T^2 factor keeps the soft-label gradients on the scale of the hard-label ones as T
    changes (Hinton et al. 2015). Examples whose label is IGNORE contribute only the soft term.
    """
    T = float(temperature)
    soft = F.kl_div(F.log_softmax(student_logits / T, dim=-1), F.softmax(teacher_logits / T, dim=-1),
                    reduction="batchmean") * T * T
    if labels is None or not (labels != IGNORE).any():
        return soft
    hard = F.cross_entropy(student_logits, labels, ignore_index=IGNORE)
    return alpha * soft + (1 - alpha) * hard


def _relations(x: torch.Tensor, heads: int, mask: torch.Tensor) -> torch.Tensor:
    """log softmax(x_h x_h^T / sqrt(d_h)) per relation head, keys masked: [B, R, T, T]."""
    B, T, D = x.shape
    if D % heads:
        raise ValueError(f"hidden size {D} is not divisible by {heads} relation heads")
    xh = x.view(B, T, heads, D // heads).transpose(1, 2)
    scores = xh @ xh.transpose(-1, -2) / (D // heads) ** 0.5
    scores = scores.masked_fill(~mask[:, None, None, :].bool(), torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1)


def relation_loss(student_x: torch.Tensor, teacher_x: torch.Tensor, mask: torch.Tensor, heads: int) -> torch.Tensor:
    """KL(teacher relation || student relation) of one of Q, K or V, averaged over real tokens.

    Student and teacher hidden sizes may differ: both are split into the same number of
    relation heads, and the T x T relation matrices are compared (MiniLMv2, Wang et al. 2021).
    """
    ls = _relations(student_x.float(), heads, mask)
    lt = _relations(teacher_x.float(), heads, mask)
    kl = (lt.exp() * (lt - ls)).sum(-1)                         # [B, R, T] per query
    q = mask[:, None, :].to(kl.dtype)
    return (kl * q).sum() / (q.sum() * heads).clamp(min=1)


def minilmv2_loss(student_qkv, teacher_qkv, mask: torch.Tensor, heads: int) -> torch.Tensor:
    """Query-query, key-key and value-value relation losses, summed (MiniLMv2)."""
    return sum(relation_loss(s, t, mask, heads) for s, t in zip(student_qkv, teacher_qkv))


def embedding_mse(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(student_emb, teacher_emb)
