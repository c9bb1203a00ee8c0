"""Word-level LSTM language model, fp32 vs quantkit's dynamic int8 (LSTM + decoder).

The model has the shape of PyTorch's word_language_model example "medium" setting: embedding
650, 2 LSTM layers of 650 units, dropout 0.5, tied decoder off. Trained briefly on WikiText-2
valid (the only training text in ../shared), evaluated on WikiText-2 test: perplexity, size,
latency; then the same model with Int8LSTM + int8 decoder (embeddings optionally int8).

    PYTHONPATH=src python benchmarks/encoders_lstm.py [--max-steps 300] [--threads 2]

Time on 2 cores: ~1.5-3 s per training step (batch 20 x bptt 35, 33k-word softmax), so the
default 300 steps (about one pass over valid) take 10-15 minutes; evaluation 1-2 minutes.
Writes benchmarks/results/encoders_lstm.json.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoders_common import SHARED, environment, median_seconds, write_json  # noqa: E402

from quantkit.quant.dynamic import DynamicInt8Config, quantize_dynamic_, state_dict_bytes  # noqa: E402


class WordLM(nn.Module):
    def __init__(self, ntoken: int, ninp: int = 650, nhid: int = 650, nlayers: int = 2, dropout: float = 0.5):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, x, hidden=None):
        out, hidden = self.rnn(self.drop(self.encoder(x)), hidden)
        return self.decoder(self.drop(out)), hidden


def tokens(path: Path, vocab: dict[str, int], grow: bool) -> torch.Tensor:
    ids = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            for w in line.split() + ["<eos>"]:
                if w not in vocab:
                    if not grow:
                        w = "<unk>"
                    else:
                        vocab[w] = len(vocab)
                ids.append(vocab[w])
    return torch.tensor(ids)


def batchify(data: torch.Tensor, bsz: int) -> torch.Tensor:
    n = data.size(0) // bsz
    return data[:n * bsz].view(bsz, -1).t().contiguous()       # [T, B]


@torch.inference_mode()
def perplexity(model, data: torch.Tensor, bptt: int = 35) -> float:
    model.eval()
    total, count, hidden = 0.0, 0, None
    for i in range(0, data.size(0) - 1, bptt):
        x, y = data[i:i + bptt], data[i + 1:i + 1 + bptt]
        x = x[:len(y)]
        out, hidden = model(x, hidden)
        total += nn.functional.cross_entropy(out.reshape(-1, out.size(-1)), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    return math.exp(total / count)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument("--eval-tokens", type=int, default=60000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=20.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.time()
    vocab = {"<unk>": 0, "<eos>": 1}
    train = batchify(tokens(SHARED / "wikitext-2" / "valid.txt", vocab, True), 20)
    test_ids = tokens(SHARED / "wikitext-2" / "test.txt", vocab, False)[:args.eval_tokens]
    test = batchify(test_ids, 10)
    model = WordLM(len(vocab))
    bptt, step, hidden = 35, 0, None
    lr = args.lr
    t_train = time.time()
    while step < args.max_steps:
        model.train()
        for i in range(0, train.size(0) - 1 - bptt, bptt):
            x, y = train[i:i + bptt], train[i + 1:i + 1 + bptt]
            hidden = None if hidden is None else tuple(h.detach() for h in hidden)
            out, hidden = model(x, hidden)
            loss = nn.functional.cross_entropy(out.reshape(-1, out.size(-1)), y.reshape(-1))
            model.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(p.grad, alpha=-lr)
            step += 1
            if step % 50 == 0:
                print(f"step {step} loss {loss.item():.3f} ({time.time() - t_train:.0f} s)", flush=True)
            if step >= args.max_steps:
                break
        lr /= 4
    res = {"environment": environment(), "vocab": len(vocab), "train_tokens": train.numel(),
           "steps": step, "train_seconds": round(time.time() - t_train, 1), "eval_tokens": int(test.numel())}
    model.eval()
    q = copy.deepcopy(model)
    quantize_dynamic_(q, DynamicInt8Config())                                   # LSTM + decoder
    qe = copy.deepcopy(model)
    quantize_dynamic_(qe, DynamicInt8Config(quantize_embeddings=True))
    x1 = test[:35, :1]
    x10 = test[:35]
    for name, m in (("fp32", model), ("int8", q), ("int8+emb", qe)):
        m.eval()
        with torch.inference_mode():
            row = {"bytes": state_dict_bytes(m), "perplexity": perplexity(m, test),
                   "latency_ms_35tok_b1": 1e3 * median_seconds(lambda: m(x1), 5),
                   "latency_ms_35tok_b10": 1e3 * median_seconds(lambda: m(x10), 5)}
        res[name] = row
        print(name, row, flush=True)
    # LSTM alone, against torch's own fp32 LSTM kernel
    with torch.inference_mode():
        xl = torch.randn(35, 10, 650)
        res["lstm_only_ms"] = {"fp32": 1e3 * median_seconds(lambda: model.rnn(xl), 5),
                               "int8": 1e3 * median_seconds(lambda: q.rnn(xl), 5)}
    res["seconds"] = round(time.time() - t0, 1)
    print(write_json("encoders_lstm", res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
