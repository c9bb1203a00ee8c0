"""Shared pieces of the encoder tests (test_dynamic, test_encoder, test_distill).

- `minilm()`: the bundled all-MiniLM-L6-v2, loaded once per session however many modules ask
  (pytest would build a fixture imported into two modules twice, so the cache is here).
  Callers must not modify it: deep-copy first.
- `save_tiny_bert(path, labels)`: a random 2-layer, 32-wide BERT with MiniLM's tokenizer, for
  fast CLI, resume and error-path tests.
- these modules use conftest's `one_thread` fixture: the models here are small or the batches short, so a second
  intra-op thread adds little on an idle 2-core box (about 1.3x) and costs much on a busy one:
  every op ends at a barrier that waits for whichever thread was descheduled (MiniLM at
  batch 1, load average 4: 190 ms per sentence with 2 threads, 29 ms with 1).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@functools.cache
def minilm():
    from quantkit.api import load_encoder
    return load_encoder()


def save_tiny_bert(path: Path, labels: list[str] | None = None) -> Path:
    from transformers import BertConfig, BertModel

    from quantkit.models.encoder import Encoder, EncoderMeta, save_encoder

    mini = minilm()
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=mini.config.vocab_size, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64)
    enc = Encoder(BertModel(cfg, add_pooling_layer=False), mini.tokenizer, EncoderMeta(labels=labels),
                  mini.source_dir)
    return Path(save_encoder(enc, path))
