"""How well an encoder does: a classifier's accuracy, a sentence encoder's cosine to its teacher."""

from __future__ import annotations

import torch

from ..models.encoder import Encoder


@torch.no_grad()
def accuracy(enc: Encoder, texts: list[str], labels: list[str], batch_size: int = 64) -> float:
    pred = enc.predict(texts, batch_size).argmax(-1).tolist()
    names = enc.meta.labels
    return sum(names[p] == y for p, y in zip(pred, labels)) / len(labels)


@torch.no_grad()
def embedding_cosine(teacher: Encoder | torch.Tensor, student: Encoder, texts: list[str]) -> float:
    """Mean cosine of student to teacher embeddings (teacher given as an Encoder or its vectors)."""
    ref = teacher if isinstance(teacher, torch.Tensor) else teacher.encode(texts)
    return float((ref * student.encode(texts)).sum(1).mean())
