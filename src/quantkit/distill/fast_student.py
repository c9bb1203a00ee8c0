"""Data distillation into the fastest students: a bag-of-n-grams (fastText-style) or a CNN classifier.

Tang et al. 2019 ("Distilling Task-Specific Knowledge from BERT into Simple Neural Networks"):
a model with no attention at all, trained on the gold sentences plus many augmented sentences
(augment.py) that only the teacher labels, gets a good part of the teacher's accuracy at a
small fraction of its cost. Two shapes:

- "bow": the mean of the embeddings of the sentence's WordPiece ids and of its hashed token
  bigrams (Joulin et al. 2017, fastText), a linear layer on top. One EmbeddingBag call per batch.
- "cnn": WordPiece embeddings, 1-D convolutions of widths 2, 3 and 4, max over time, a linear
  layer (Kim 2014).

Both read text through the teacher's own tokenizer, so the student and teacher cannot disagree
on vocabulary; the student is saved with it. Loss: the same soft + hard label loss as the BERT
student (losses.kd_loss); augmented sentences have no gold label and contribute the soft term only.

Saved layout (a directory, written atomically, no pickle):
    quantkit.json       {"format": "quantkit-fast-student", "arch": ..., labels, shape fields}
    model.safetensors   the student's tensors
    tokenizer.json      the teacher's tokenizer
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..util.atomic import atomic_output
from ..util.errors import QuantkitError
from ..util.progress import progress
from .losses import IGNORE, kd_loss

FORMAT = "quantkit-fast-student"
ARCHS = ("bow", "cnn")


@dataclass
class FastStudentShape:
    arch: str = "bow"
    vocab_size: int = 30522
    dim: int = 64
    bigram_buckets: int = 1 << 16       # bow: hashed token bigrams (0 = unigrams only)
    channels: int = 128                 # cnn: filters per width
    widths: tuple[int, ...] = (2, 3, 4)
    max_tokens: int = 64
    labels: tuple[str, ...] = ("0", "1")
    pad_id: int = 0


def _hash_bigrams(ids: list[int], buckets: int, offset: int) -> list[int]:
    # a fixed multiplicative hash (not Python's hash(), which is salted per process)
    return [offset + (a * 1_000_003 + b) % buckets for a, b in zip(ids, ids[1:])]


class FastStudent(nn.Module):
    def __init__(self, shape: FastStudentShape, tokenizer):
        super().__init__()
        if shape.arch not in ARCHS:
            raise QuantkitError(f"unknown student architecture {shape.arch!r}; choose {', '.join(ARCHS)} (or bert)")
        self.shape = shape
        self.tokenizer = tokenizer
        n = len(shape.labels)
        if shape.arch == "bow":
            self.emb = nn.EmbeddingBag(shape.vocab_size + shape.bigram_buckets, shape.dim, mode="mean", sparse=True)
            nn.init.uniform_(self.emb.weight, -1 / shape.dim, 1 / shape.dim)
            self.out = nn.Linear(shape.dim, n)
        else:
            self.emb = nn.Embedding(shape.vocab_size, shape.dim, padding_idx=shape.pad_id, sparse=True)
            nn.init.normal_(self.emb.weight, std=0.1)
            self.convs = nn.ModuleList(nn.Conv1d(shape.dim, shape.channels, w) for w in shape.widths)
            self.out = nn.Linear(shape.channels * len(shape.widths), n)
        self.drop = nn.Dropout(0.2)

    @property
    def labels(self) -> list[str]:
        return list(self.shape.labels)

    def token_ids(self, sentences: list[str]) -> list[list[int]]:
        """WordPiece ids of each sentence, [CLS]/[SEP] left out, cut at max_tokens."""
        tok = self.tokenizer
        tok.no_padding()
        tok.no_truncation()
        encs = tok.encode_batch(list(sentences), add_special_tokens=False)
        return [e.ids[:self.shape.max_tokens] or [self.shape.pad_id] for e in encs]

    def featurize(self, sentences: list[str]) -> dict[str, torch.Tensor]:
        """The model's input tensors for a batch (the tokenizer's work, kept out of forward)."""
        return _collate(self, self.token_ids(sentences))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.shape.arch == "bow":
            h = self.emb(batch["ids"], batch["offsets"])
        else:
            e = self.emb(batch["ids"]).transpose(1, 2)                   # [B, dim, T]
            h = torch.cat([torch.relu(c(e)).amax(dim=2) for c in self.convs], dim=1)
        return self.out(self.drop(h))

    @torch.inference_mode()
    def predict(self, sentences: list[str], batch_size: int = 256) -> torch.Tensor:
        was = self.training
        self.eval()
        out = [self(self.featurize(sentences[i:i + batch_size])) for i in range(0, len(sentences), batch_size)]
        self.train(was)
        return torch.cat(out)


def accuracy(model: FastStudent, texts: list[str], labels: list[str]) -> float:
    pred = model.predict(texts).argmax(-1).tolist()
    return sum(model.labels[p] == y for p, y in zip(pred, labels)) / len(labels)


def save_fast_student(model: FastStudent, path: str | os.PathLike, history: list[dict] | None = None) -> str:
    from safetensors.torch import save_file

    final = os.fspath(path)
    with atomic_output(final, directory=True) as tmp:
        meta = {"format": FORMAT, "version": 1, **asdict(model.shape), "history": history or []}
        with open(os.path.join(tmp, "quantkit.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                  os.path.join(tmp, "model.safetensors"))
        model.tokenizer.save(os.path.join(tmp, "tokenizer.json"))
    return final


def is_fast_student(path: str | os.PathLike) -> bool:
    p = os.path.join(os.fspath(path), "quantkit.json")
    if not os.path.exists(p):
        return False
    try:
        with open(p, encoding="utf-8") as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def load_fast_student(path: str | os.PathLike) -> FastStudent:
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    p = os.fspath(path)
    if not is_fast_student(p):
        raise QuantkitError("not a bow/cnn student (no quantkit.json of format quantkit-fast-student)", p)
    with open(os.path.join(p, "quantkit.json"), encoding="utf-8") as f:
        meta = json.load(f)
    fields = set(FastStudentShape.__dataclass_fields__)
    kw = {k: v for k, v in meta.items() if k in fields}
    kw["widths"], kw["labels"] = tuple(kw["widths"]), tuple(kw["labels"])
    model = FastStudent(FastStudentShape(**kw), Tokenizer.from_file(os.path.join(p, "tokenizer.json")))
    try:
        model.load_state_dict(load_file(os.path.join(p, "model.safetensors")))
    except Exception as e:
        raise QuantkitError(f"weights do not match quantkit.json ({str(e).splitlines()[0]})", p) from None
    return model.eval()


def train_fast_student(model: FastStudent, texts: list[str], gold: list[int], targets: torch.Tensor | None,
                       *, epochs: float, batch_size: int, lr: float, temperature: float, alpha: float,
                       seed: int = 0, max_steps: int | None = None) -> list[tuple[int, float]]:
    """Adam on kd_loss (soft term only where gold is IGNORE; hard labels only if no targets).

    Sentences are featurised once, up front (the tokenizer is the slow part of a bow step)."""
    n = len(texts)
    feats = model.token_ids(texts)
    steps_per_epoch = math.ceil(n / batch_size)
    total = max_steps or max(1, math.ceil(epochs * steps_per_epoch))
    # the embedding table is almost all of the student and a batch touches a few hundred of its
    # rows: sparse gradients and lazy Adam on it (dense Adam over 6M rows per step was ~5x slower)
    sparse = list(model.emb.parameters())
    dense = [p for n, p in model.named_parameters() if not n.startswith("emb.")]
    opts = [torch.optim.SparseAdam(sparse, lr=lr), torch.optim.Adam(dense, lr=lr)]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    y_all = torch.tensor(gold)
    losses: list[tuple[int, float]] = []
    model.train()
    bar = progress(total=total, desc=f"{model.shape.arch} student", unit="step")
    step = 0
    try:
        while step < total:
            perm = torch.randperm(n, generator=g).tolist()
            for i in range(0, n, batch_size):
                idx = perm[i:i + batch_size]
                batch = _collate(model, [feats[j] for j in idx])
                logits = model(batch)
                y = y_all[idx]
                if targets is None:
                    loss = nn.functional.cross_entropy(logits, y, ignore_index=IGNORE)
                else:
                    loss = kd_loss(logits, targets[idx], y, temperature, alpha)
                for o in opts:
                    o.zero_grad(set_to_none=True)
                loss.backward()
                for o in opts:
                    o.step()
                step += 1
                losses.append((step, loss.item()))
                bar.set_postfix(loss=f"{losses[-1][1]:.4f}")
                bar.update(1)
                if step >= total:
                    break
    finally:
        bar.close()
    model.eval()
    return losses


def _collate(model: FastStudent, ids: list[list[int]]) -> dict[str, torch.Tensor]:
    s = model.shape
    if s.arch == "bow":
        flat, offsets = [], []
        for t in ids:
            offsets.append(len(flat))
            flat.extend(t)
            if s.bigram_buckets:
                flat.extend(_hash_bigrams(t, s.bigram_buckets, s.vocab_size))
        return {"ids": torch.tensor(flat, dtype=torch.long), "offsets": torch.tensor(offsets, dtype=torch.long)}
    width = max(max(len(t) for t in ids), max(s.widths))
    x = torch.full((len(ids), width), s.pad_id, dtype=torch.long)
    for i, t in enumerate(ids):
        x[i, :len(t)] = torch.tensor(t)
    return {"ids": x}


def teacher_logits(teacher, texts: list[str], max_length: int = 64, batch_size: int = 128) -> torch.Tensor:
    """The teacher's logits for every sentence (the soft labels), with a progress bar."""
    teacher.eval()
    outs = []
    bar = progress(total=len(texts), desc="teacher labels", unit="ex")
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            outs.append(teacher.logits(teacher.tokenize(texts[i:i + batch_size], max_length)).float())
            bar.update(len(outs[-1]))
    bar.close()
    return torch.cat(outs)


def distill_fast(cfg) -> dict:
    """trainer.distill for student_arch "bow" / "cnn" (cfg: trainer.DistillConfig).

    kd: teacher logits on gold + `augment` augmented sentences per gold one; finetune: gold
    labels only (the baseline), the tokenizer taken from --model / the bundled encoder."""
    from ..models.encoder import bundled_encoder_path, check_encoder_dir, load_tokenizer
    from ..quant.dynamic import open_encoder
    from . import augment as A
    from ..util.textdata import read_labelled, sample_indices

    t0 = time.time()
    if cfg.objective not in ("kd", "finetune"):
        raise QuantkitError(f"a {cfg.student_arch} student is trained with kd or finetune, not {cfg.objective}")
    if cfg.resume:
        raise QuantkitError(f"--resume is for BERT students; a {cfg.student_arch} student trains in seconds to "
                            "minutes and is written only when done", cfg.output, "run again without --resume")
    if cfg.student or cfg.num_layers or cfg.layers or cfg.hidden:
        raise QuantkitError(f"--student/--num-layers/--layers/--hidden describe BERT students, not {cfg.student_arch}")
    if cfg.objective == "kd" and not cfg.teacher:
        raise QuantkitError("kd needs a classifier teacher", None, "pass --teacher (made by `distill finetune`)")
    if cfg.objective == "kd":
        teacher = open_encoder(cfg.teacher)
        tokenizer, labels, pad_id = teacher.tokenizer, teacher.meta.labels, teacher.config.pad_token_id or 0
        if teacher.meta.quantization:
            raise QuantkitError("the teacher is quantized; distil from the fp32 model", cfg.teacher)
        if not teacher.meta.labels:
            raise QuantkitError("the teacher has no classification head", cfg.teacher,
                                "fine-tune it first: quantkit distill finetune --train TSV")
    else:   # gold labels only: the encoder directory gives just its tokenizer (no need to build the BERT)
        src = bundled_encoder_path() if cfg.teacher is None else os.fspath(cfg.teacher)
        hf = check_encoder_dir(src)
        tokenizer, labels, pad_id = load_tokenizer(src), None, hf.get("pad_token_id") or 0
    texts, ylabels = read_labelled(cfg.train, labels)
    keep = sample_indices(len(texts), cfg.limit, cfg.seed)
    texts, ylabels = [texts[i] for i in keep], [ylabels[i] for i in keep]
    names = labels or sorted(set(ylabels))
    gold = [names.index(y) for y in ylabels]
    n_gold = len(texts)
    if cfg.objective == "kd" and cfg.augment > 0:
        acfg = A.AugmentConfig(p_unk=cfg.p_unk, p_replace=cfg.p_replace, p_span=cfg.p_span)
        classes = A.WordClasses.from_corpus(texts, acfg.n_classes, min_count=acfg.min_count, seed=cfg.seed)
        extra = A.augment_corpus(texts, cfg.augment, acfg, classes, cfg.seed)
        texts, gold = texts + extra, gold + [IGNORE] * len(extra)
    targets = teacher_logits(teacher, texts, cfg.max_length) if cfg.objective == "kd" else None
    shape = FastStudentShape(arch=cfg.student_arch, vocab_size=tokenizer.get_vocab_size(), max_tokens=cfg.max_length,
                             labels=tuple(names), pad_id=pad_id)
    torch.manual_seed(cfg.seed)
    model = FastStudent(shape, tokenizer)
    losses = train_fast_student(model, texts, gold, targets, epochs=cfg.epochs, batch_size=cfg.batch_size,
                                lr=cfg.head_lr, temperature=cfg.temperature, alpha=cfg.alpha, seed=cfg.seed,
                                max_steps=cfg.max_steps)
    history = [{"objective": cfg.objective, "student_arch": cfg.student_arch, "teacher": cfg.teacher,
                "examples": n_gold, "augmented": len(texts) - n_gold, "steps": len(losses)}]
    save_fast_student(model, cfg.output, history)
    summary = {"objective": cfg.objective, "student_arch": cfg.student_arch, "steps": len(losses),
               "examples": n_gold, "augmented": len(texts) - n_gold, "student_layers": 0, "hidden": shape.dim,
               "parameters": sum(p.numel() for p in model.parameters()),
               "first_loss": losses[0][1], "last_loss": losses[-1][1], "losses": losses,
               "seconds": round(time.time() - t0, 1), "output": os.fspath(cfg.output)}
    if cfg.dev:
        dev_texts, dev_labels = read_labelled(cfg.dev, names)
        dev_texts, dev_labels = dev_texts[:cfg.dev_limit], dev_labels[:cfg.dev_limit]
        summary["dev_accuracy"] = accuracy(model, dev_texts, dev_labels)
        if cfg.objective == "kd":
            from .scoring import accuracy as enc_accuracy
            summary["teacher_dev_accuracy"] = enc_accuracy(teacher, dev_texts, dev_labels)
    return summary
