"""Word-level LSTM language model, fp32 vs quantkit's dynamic int8 (LSTM + decoder).

The model has the shape of PyTorch's word_language_model example "medium" setting (embedding
650, 2 LSTM layers of 650 units, untied decoder) with the example's recipe (plain SGD, lr 20,
gradient clip 0.25, batch 20, bptt 35) but dropout 0.2 (the example's default; 0.5 is for
its 40-epoch runs, and only slows a few-minute run). Trained briefly on WikiText-2 valid (the
only training text in ../shared; its words are the vocabulary, test words outside it are
<unk>), evaluated on WikiText-2 test: perplexity, size, latency; then the same model with
quantkit's Int8LSTM + int8 decoder (embeddings optionally int8). torch.ao no longer converts
nn.LSTM in torch 2.13, so the int8 side is quantkit's own (quant/dynamic.py: fbgemm int8
GEMMs, gates in fp32, a Python loop over time steps); the fp32 side is torch's fused LSTM.

    PYTHONPATH=src python benchmarks/encoders_lstm.py [--max-steps 60] [--eval-tokens 30000]

Time on the shared 2-core box: 4.3 s per training step at load 3, 9.8 s at load 7-11 (batch
20 x bptt 35, a 13.8k-word softmax; forward + backward), so the default 60 steps (42k tokens, a
fifth of valid) take 4-10 minutes; evaluation and latency 3-8 minutes. Writes benchmarks/results/encoders_lstm.json.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoders_common import SHARED, environment, write_json  # noqa: E402

from quantkit.quant.dynamic import DynamicInt8Config, quantize_dynamic_, state_dict_bytes  # noqa: E402
from quantkit.util.progress import progress  # noqa: E402


class WordLM(nn.Module):
    def __init__(self, ntoken: int, ninp: int = 650, nhid: int = 650, nlayers: int = 2, dropout: float = 0.2):
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
def perplexity(model, data: torch.Tensor, bptt: int = 35, desc: str = "perplexity") -> float:
    model.eval()
    total, count, hidden = 0.0, 0, None
    for i in progress(range(0, data.size(0) - 1, bptt), desc=desc, unit="window"):
        x, y = data[i:i + bptt], data[i + 1:i + 1 + bptt]
        x = x[:len(y)]
        out, hidden = model(x, hidden)
        total += nn.functional.cross_entropy(out.reshape(-1, out.size(-1)), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    return math.exp(total / count)


def latency_interleaved(models: dict, inputs: torch.Tensor, runs: int = 7) -> dict:
    """Median ms of one forward per model; the models take turns in every run (A B A B ...)."""
    for m in models.values():
        m(inputs)
    times: dict = {k: [] for k in models}
    for _ in range(runs):
        for k, m in models.items():
            t = time.perf_counter()
            m(inputs)
            times[k].append(time.perf_counter() - t)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-steps", type=int, default=60)
    ap.add_argument("--eval-tokens", type=int, default=30000)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for training and perplexity")
    ap.add_argument("--latency-threads", default="1,2", help="thread counts to time latency with")
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
    load_train = [os.getloadavg()[0]]
    bar = progress(total=args.max_steps, desc="train", unit="step")
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
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step >= args.max_steps:
                break
        lr /= 4
    bar.close()
    load_train.append(os.getloadavg()[0])
    res = {"environment": environment(), "vocab": len(vocab), "train_tokens_per_step": 20 * bptt,
           "steps": step, "train_seconds": round(time.time() - t_train, 1), "load_avg_1m_train": load_train,
           "last_train_loss": loss.item(), "eval_tokens": int(test.numel()), "eval_batch": 10}
    print({k: v for k, v in res.items() if k != "environment"}, flush=True)
    model.eval()
    q = copy.deepcopy(model)
    quantize_dynamic_(q, DynamicInt8Config())                                   # LSTM + decoder
    qe = copy.deepcopy(model)
    quantize_dynamic_(qe, DynamicInt8Config(quantize_embeddings=True))
    models = {"fp32": model, "int8": q, "int8+emb": qe}
    with torch.inference_mode():
        for name, m in models.items():
            res[name] = {"bytes": state_dict_bytes(m), "lstm_bytes": state_dict_bytes(m.rnn),
                         "perplexity": perplexity(m, test, desc=f"perplexity {name}")}
            print(name, res[name], flush=True)
        # latency: one 35-token window, batch 1 and 10, models timed in alternation
        res["latency"] = []
        for nt in [int(t) for t in args.latency_threads.split(",")]:
            torch.set_num_threads(nt)
            for bs in (1, 10):
                load0 = os.getloadavg()[0]
                ms = latency_interleaved(models, test[:bptt, :bs])
                row = {"threads": nt, "batch": bs, "tokens": bptt, **{f"{k}_ms": v for k, v in ms.items()},
                       "speedup_int8": ms["fp32"] / ms["int8"], "load_avg_1m": [load0, os.getloadavg()[0]]}
                res["latency"].append(row)
                print(row, flush=True)
            # the LSTM alone (no decoder), against torch's own fused fp32 LSTM
            for bs in (1, 10):
                xl = torch.randn(bptt, bs, 650)
                ms = latency_interleaved({"fp32": model.rnn, "int8": q.rnn}, xl)
                row = {"threads": nt, "batch": bs, "tokens": bptt, "lstm_only": True, "fp32_ms": ms["fp32"],
                       "int8_ms": ms["int8"], "speedup_int8": ms["fp32"] / ms["int8"]}
                res["latency"].append(row)
                print(row, flush=True)
    res["seconds"] = round(time.time() - t0, 1)
    print(write_json("encoders_lstm", res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
