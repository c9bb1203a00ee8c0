"""Fine-tuning and distillation of BERT-family encoders, resumable.

Three objectives, one loop:

- "finetune": a classifier (encoder + linear head on the mean-pooled vector) on gold labels.
  Makes the SST-2 teacher, and the hard-label-only baseline of a student.
- "kd": a student learns from a classifier teacher: KL at temperature T to the teacher's
  logits + cross entropy to gold labels, optional MiniLMv2 Q/K/V relation loss, optional
  augmented sentences that only the teacher labels.
- "embed": a student sentence encoder matches the teacher's pooled embeddings (MSE) on
  unlabelled text.

With `student_arch` "bow" or "cnn", finetune and kd train one of the fastest students instead
(fast_student.py: a bag of n-grams or a CNN over the teacher's tokenizer, trained on gold plus
teacher-labelled augmented sentences); everything below is about BERT students.

Students are built from the teacher: the same embeddings and a subset of its layers
(`layers`, default evenly spaced), or a fresh BERT of a smaller hidden size over the same
vocabulary; or an existing encoder directory, whose vocabulary must equal the teacher's.

Resume: the data order of every epoch and the dropout seed of every step are functions of
(seed, step) only, and the learning rate a function of the step, so a checkpoint (student
weights + AdamW moments + step, written atomically) resumes onto the same trajectory.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..models.encoder import Encoder, EncoderMeta, load_encoder, save_encoder
from ..quant.dynamic import open_encoder
from ..util.atomic import atomic_output, check_writable_dir
from ..util.errors import QuantkitError
from ..util.progress import progress
from ..util.textdata import read_labelled, read_text, sample_indices
from . import augment as A
from .losses import IGNORE, embedding_mse, kd_loss, minilmv2_loss
from .scoring import accuracy, embedding_cosine

OBJECTIVES = ("finetune", "kd", "embed")


@dataclass
class DistillConfig:
    objective: str = "kd"
    teacher: str | None = None          # kd/embed: the teacher; finetune: the model to train (None = bundled)
    train: str = ""                     # TSV label<TAB>text (finetune, kd) or text file (embed)
    output: str = ""
    dev: str | None = None              # evaluation file of the same kind as train
    dev_limit: int | None = None        # evaluate on the first N dev examples only
    student: str | None = None          # an existing encoder dir to start the student from
    num_layers: int | None = None       # student depth (layers taken evenly from the teacher)
    layers: list[int] | None = None     # or exactly which teacher layers
    hidden: int | None = None           # fresh student of this width (random init)
    student_arch: str = "bert"          # "bert", or "bow" / "cnn": the fastest students (fast_student.py)
    temperature: float = 2.0
    alpha: float = 0.5                  # weight of the soft-label term; 1 - alpha for gold labels
    relation_weight: float = 0.0        # MiniLMv2 Q/K/V relation loss weight (0 = off)
    relation_heads: int = 12
    relation_layer: int = -1            # teacher layer whose relations are copied
    augment: int = 0                    # augmented sentences per training sentence (kd)
    p_unk: float = 0.1
    p_replace: float = 0.1
    p_span: float = 0.25
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 5e-5
    head_lr: float = 1e-3               # a new classification head starts from zero knowledge
    weight_decay: float = 0.01
    # the 30k x hidden word-embedding table is half of MiniLM's weights; updating it from a few
    # thousand sentences buys little and costs a third of a CPU step (and its AdamW moments)
    train_word_embeddings: bool = False
    warmup: float = 0.06
    max_length: int = 64
    limit: int | None = None            # use only this many training examples (seeded sample)
    seed: int = 0
    checkpoint_dir: str | None = None   # default OUTPUT.ckpt
    save_every: int = 200
    resume: bool = False

    def trajectory(self) -> dict:
        """The fields a checkpoint must agree on to be resumed."""
        d = asdict(self)
        for k in ("output", "dev", "dev_limit", "checkpoint_dir", "save_every", "resume", "max_steps", "epochs"):
            d.pop(k)
        return d


# ---- students -------------------------------------------------------------------------
def evenly_spaced(n_teacher: int, n_student: int) -> list[int]:
    if not 1 <= n_student <= n_teacher:
        raise QuantkitError(f"student layers must be 1..{n_teacher}, got {n_student}")
    return [int(i * n_teacher / n_student) for i in range(n_student)]


def check_same_vocab(teacher: Encoder, student: Encoder, where: str | None = None) -> None:
    tv, sv = teacher.vocab(), student.vocab()
    if tv == sv and teacher.config.vocab_size == student.config.vocab_size:
        return
    diff = next((t for t in sorted(tv, key=tv.get) if sv.get(t) != tv[t]), None)
    example = f"; e.g. {diff!r} is {tv[diff]} in the teacher, {sv.get(diff)} in the student" if diff else ""
    raise QuantkitError(f"teacher and student vocabularies are incompatible ({len(tv)} vs {len(sv)} tokens{example})",
                        where, "distil into a student that uses the teacher's tokenizer")


def make_student(teacher: Encoder, cfg: DistillConfig) -> Encoder:
    from transformers import BertConfig, BertModel

    if cfg.student:
        student = open_encoder(cfg.student)
        if student.meta.quantization:
            raise QuantkitError("the student is quantized; train in fp32 and quantize afterwards", cfg.student)
        check_same_vocab(teacher, student, cfg.student)
        if teacher.meta.labels and student.meta.labels != teacher.meta.labels:
            student.add_head(teacher.meta.labels)
        return student
    n_t = teacher.num_layers
    if cfg.hidden:
        heads = max(1, cfg.hidden // 32)
        if cfg.hidden % heads:
            raise QuantkitError(f"hidden size {cfg.hidden} must be a multiple of 32")
        bc = BertConfig(vocab_size=teacher.config.vocab_size, hidden_size=cfg.hidden,
                        num_hidden_layers=cfg.num_layers or n_t, num_attention_heads=heads,
                        intermediate_size=4 * cfg.hidden, max_position_embeddings=teacher.config.max_position_embeddings,
                        type_vocab_size=teacher.config.type_vocab_size, pad_token_id=teacher.config.pad_token_id)
        torch.manual_seed(cfg.seed)
        student = Encoder(BertModel(bc, add_pooling_layer=False), teacher.tokenizer,
                          EncoderMeta(**{**asdict(teacher.meta), "labels": None, "history": list(teacher.meta.history)}),
                          teacher.source_dir)
        if teacher.meta.labels:
            student.add_head(teacher.meta.labels)
        return student
    layers = cfg.layers if cfg.layers is not None else evenly_spaced(n_t, cfg.num_layers or n_t)
    bad = [i for i in layers if not 0 <= i < n_t]
    if bad or not layers:
        raise QuantkitError(f"teacher layers {bad or layers} do not exist (the teacher has {n_t}: 0..{n_t - 1})")
    student = copy.deepcopy(teacher)
    student.bert.encoder.layer = nn.ModuleList(copy.deepcopy(teacher.bert.encoder.layer[i]) for i in layers)
    student.bert.config.num_hidden_layers = len(layers)
    for i, layer in enumerate(student.bert.encoder.layer):     # keep HF's per-layer index consistent
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = i
    return student


# ---- checkpoints ----------------------------------------------------------------------
def save_checkpoint(path: str, student: Encoder, opt: torch.optim.Optimizer, step: int, cfg: DistillConfig) -> None:
    from safetensors.torch import save_file

    with atomic_output(path, directory=True) as tmp:
        save_encoder(student, os.path.join(tmp, "student"))
        tensors = {}
        for i, st in opt.state_dict()["state"].items():
            for k, v in st.items():
                tensors[f"{i}.{k}"] = torch.as_tensor(v).contiguous()
        save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
        with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
            json.dump({"step": step, "trajectory": cfg.trajectory()}, f, indent=2)


def load_checkpoint(path: str, student: Encoder, opt: torch.optim.Optimizer, cfg: DistillConfig) -> int:
    from safetensors.torch import load_file

    try:
        with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise QuantkitError(f"unreadable checkpoint ({e})", path, "delete it to start over") from None
    if state["trajectory"] != cfg.trajectory():
        diff = sorted(k for k, v in cfg.trajectory().items() if state["trajectory"].get(k) != v)
        raise QuantkitError(f"checkpoint was made with different settings ({', '.join(diff)})", path,
                            "use the same options, or delete the checkpoint to start over")
    saved = open_encoder(os.path.join(path, "student"))
    student.load_state_dict(saved.state_dict())
    flat = load_file(os.path.join(path, "optimizer.safetensors"))
    osd = opt.state_dict()
    new_state: dict = {}
    for key, v in flat.items():
        i, k = key.split(".", 1)
        new_state.setdefault(int(i), {})[k] = v
    osd["state"] = new_state
    opt.load_state_dict(osd)
    return int(state["step"])


# ---- training -------------------------------------------------------------------------
class _QKV:
    """Forward hooks that keep the query/key/value projections of one BERT layer."""

    def __init__(self, enc: Encoder, layer: int):
        attn = enc.bert.encoder.layer[layer].attention.self
        self.out: list[torch.Tensor] = [None, None, None]
        self.handles = [getattr(attn, n).register_forward_hook(self._hook(i))
                        for i, n in enumerate(("query", "key", "value"))]

    def _hook(self, i):
        def f(_m, _inp, out):
            self.out[i] = out
        return f

    def remove(self):
        for h in self.handles:
            h.remove()


def _lr_at(step: int, total: int, cfg: DistillConfig) -> float:
    warm = max(1, int(cfg.warmup * total))
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (total - step) / max(1, total - warm))


def distill(cfg: DistillConfig) -> dict:
    """Train per `cfg`; writes the student (or fine-tuned model) to cfg.output; returns a summary."""
    if cfg.objective not in OBJECTIVES:
        raise QuantkitError(f"unknown objective {cfg.objective!r}; choose {', '.join(OBJECTIVES)}")
    if not cfg.output:
        raise QuantkitError("no output given", None, "pass -o OUT_DIR")
    check_writable_dir(cfg.output)
    if cfg.student_arch != "bert":
        from .fast_student import ARCHS, distill_fast
        if cfg.student_arch not in ARCHS:
            raise QuantkitError(f"unknown student architecture {cfg.student_arch!r}; choose bert, {', '.join(ARCHS)}")
        return distill_fast(cfg)
    if cfg.objective == "kd" and not cfg.teacher:
        raise QuantkitError("kd needs a classifier teacher", None, "pass --teacher (made by `distill finetune`)")
    ckpt = cfg.checkpoint_dir or os.fspath(cfg.output).rstrip("/") + ".ckpt"
    t_start = time.time()

    base, teacher = _open_models(cfg)
    data = _read_data(cfg, base)
    student = _student_for(cfg, base, teacher)
    initial_cosine = dev_ref = None
    if cfg.objective == "embed" and data.dev_texts is not None:
        dev_ref = teacher.encode(data.dev_texts)
        if not cfg.resume:
            initial_cosine = embedding_cosine(dev_ref, student, data.dev_texts)
    student.requires_grad_(True)
    if not cfg.train_word_embeddings:
        student.bert.embeddings.word_embeddings.requires_grad_(False)
    n_gold = len(data.texts)
    if cfg.objective == "kd" and cfg.augment > 0:
        _augment(cfg, data)
    targets = teacher_targets(cfg, teacher, data.texts) if teacher is not None and cfg.relation_weight == 0 else None

    step, losses = _train(cfg, student, teacher, data, targets, ckpt)

    student.eval().requires_grad_(False)
    summary = {"objective": cfg.objective, "steps": step, "examples": n_gold, "augmented": len(data.texts) - n_gold,
               "student_layers": student.num_layers, "hidden": student.hidden_size,
               "parameters": sum(p.numel() for p in student.parameters()),
               "first_loss": losses[0][1] if losses else None, "last_loss": losses[-1][1] if losses else None,
               "losses": losses, "seconds": round(time.time() - t_start, 1)}
    if data.dev_texts is not None:
        if cfg.objective == "embed":
            summary["dev_cosine"] = embedding_cosine(dev_ref, student, data.dev_texts)
            if initial_cosine is not None:
                summary["dev_cosine_initial"] = initial_cosine
        else:
            summary["dev_accuracy"] = accuracy(student, data.dev_texts, data.dev_labels)
            if teacher is not None:
                summary["teacher_dev_accuracy"] = accuracy(teacher, data.dev_texts, data.dev_labels)
    student.meta.history = list(student.meta.history) + [{
        "objective": cfg.objective, "teacher": cfg.teacher, "train": os.path.basename(cfg.train), "steps": step,
        **{k: summary[k] for k in ("dev_accuracy", "dev_cosine") if k in summary}}]
    save_encoder(student, cfg.output)
    summary["output"] = os.fspath(cfg.output)
    summary["checkpoint"] = ckpt
    return summary


def _open_models(cfg: DistillConfig) -> tuple[Encoder, Encoder | None]:
    """(the model whose labels and tokenizer the data follows, the teacher or None for finetune)."""
    if cfg.objective == "finetune":
        return open_encoder(cfg.teacher), None
    teacher = open_encoder(cfg.teacher)
    if teacher.meta.quantization:
        raise QuantkitError("the teacher is quantized; distil from the fp32 model", cfg.teacher)
    if cfg.objective == "kd" and not teacher.meta.labels:
        raise QuantkitError("the teacher has no classification head", cfg.teacher,
                            "fine-tune it first: quantkit distill finetune --train TSV")
    teacher.eval().requires_grad_(False)
    return teacher, teacher


@dataclass
class _Data:
    texts: list[str]
    gold: list[int] | None              # label index per text (IGNORE: teacher-labelled only); None for embed
    dev_texts: list[str] | None = None
    dev_labels: list[str] | None = None


def _read_data(cfg: DistillConfig, base: Encoder) -> _Data:
    """The training examples (a seeded subset of cfg.limit) and the dev set; finetune of a
    head-less model adds a head for the labels it finds."""
    if cfg.objective == "embed":
        texts = read_text(cfg.train)
        data = _Data([texts[i] for i in sample_indices(len(texts), cfg.limit, cfg.seed)], None)
        if cfg.dev:
            data.dev_texts = read_text(cfg.dev)[:cfg.dev_limit or 1000]
        return data
    texts, ylabels = read_labelled(cfg.train, base.meta.labels)
    keep = sample_indices(len(texts), cfg.limit, cfg.seed)
    texts, ylabels = [texts[i] for i in keep], [ylabels[i] for i in keep]
    if cfg.objective == "finetune" and not base.meta.labels:
        base.add_head(sorted(set(ylabels)))
    names = base.meta.labels
    data = _Data(texts, [names.index(y) for y in ylabels])
    if cfg.dev:
        dev_texts, dev_labels = read_labelled(cfg.dev, names)
        data.dev_texts, data.dev_labels = dev_texts[:cfg.dev_limit], dev_labels[:cfg.dev_limit]
    return data


def _student_for(cfg: DistillConfig, base: Encoder, teacher: Encoder | None) -> Encoder:
    if cfg.objective == "finetune":
        if cfg.student:
            raise QuantkitError("finetune trains --model itself; --student is for kd and embed")
        return make_student(base, cfg) if (cfg.num_layers or cfg.layers or cfg.hidden) else base
    student = make_student(teacher, cfg)
    check_same_vocab(teacher, student, cfg.student)
    return student


def _augment(cfg: DistillConfig, data: _Data) -> None:
    """kd: more sentences, labelled by the teacher only (gold label IGNORE)."""
    acfg = A.AugmentConfig(p_unk=cfg.p_unk, p_replace=cfg.p_replace, p_span=cfg.p_span)
    classes = A.WordClasses.from_corpus(data.texts, acfg.n_classes, min_count=acfg.min_count, seed=cfg.seed)
    extra = A.augment_corpus(data.texts, cfg.augment, acfg, classes, cfg.seed)
    data.texts = data.texts + extra
    data.gold = data.gold + [IGNORE] * len(extra)


def teacher_targets(cfg: DistillConfig, teacher: Encoder, texts: list[str]) -> torch.Tensor:
    """The teacher's logits (kd) or pooled embeddings (embed) of every text, computed once
    (when no per-batch teacher internals are needed)."""
    bar = progress(total=len(texts), desc="teacher targets", unit="ex")
    outs = []
    with torch.inference_mode():
        for i in range(0, len(texts), 128):
            b = teacher.tokenize(texts[i:i + 128], cfg.max_length)
            outs.append(teacher.logits(b) if cfg.objective == "kd" else teacher(b))
            bar.update(len(outs[-1]))
    bar.close()
    return torch.cat(outs).float()


def _optimizer(cfg: DistillConfig, student: Encoder) -> torch.optim.Optimizer:
    """AdamW: weight decay on the body's matrices only; the head at its own learning rate."""
    head_params = list(student.head.parameters()) if student.head is not None else []
    hp = {id(p) for p in head_params}
    body = [p for p in student.parameters() if id(p) not in hp and p.requires_grad]
    decay = [p for p in body if p.dim() > 1]
    no_decay = [p for p in body if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr},
              {"params": no_decay, "weight_decay": 0.0, "lr": cfg.lr}]
    if head_params:
        groups.append({"params": head_params, "weight_decay": 0.0, "lr": cfg.head_lr})
    return torch.optim.AdamW(groups)


def _loss(cfg: DistillConfig, student: Encoder, teacher: Encoder | None, data: _Data, targets, idx: list[int],
          batch, rel) -> torch.Tensor:
    """The objective's loss on one batch (rel: the (teacher, student) Q/K/V hooks, or None)."""
    if cfg.objective == "embed":
        return embedding_mse(student(batch), targets[idx])
    y = torch.tensor([data.gold[i] for i in idx])
    logits = student.logits(batch)
    if cfg.objective == "finetune":
        return nn.functional.cross_entropy(logits, y)
    if targets is not None:
        t_logits = targets[idx]
    else:
        with torch.no_grad():
            teacher.eval()
            t_logits = teacher.logits(batch)
    loss = kd_loss(logits, t_logits, y, cfg.temperature, cfg.alpha)
    if rel is not None:
        t_rel, s_rel = rel
        loss = loss + cfg.relation_weight * minilmv2_loss(
            s_rel.out, [t.detach() for t in t_rel.out], batch["attention_mask"], cfg.relation_heads)
    return loss


def _train(cfg: DistillConfig, student: Encoder, teacher: Encoder | None, data: _Data, targets,
           ckpt: str) -> tuple[int, list[tuple[int, float]]]:
    """The optimisation loop, resumable: the data order of every epoch and the dropout seed of
    every step depend on (seed, step) only. Returns (steps done, [(step, loss)])."""
    student.train()
    opt = _optimizer(cfg, student)
    base_lrs = [g["lr"] for g in opt.param_groups]
    texts = data.texts
    steps_per_epoch = math.ceil(len(texts) / cfg.batch_size)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    step = 0
    if cfg.resume and os.path.isdir(ckpt):
        step = load_checkpoint(ckpt, student, opt, cfg)
    elif cfg.resume:
        raise QuantkitError("no checkpoint to resume from", ckpt, "run without --resume first")
    rel = None
    if cfg.relation_weight > 0:
        rel = (_QKV(teacher, cfg.relation_layer % teacher.num_layers), _QKV(student, student.num_layers - 1))

    losses: list[tuple[int, float]] = []
    bar = progress(total=total, desc=f"{cfg.objective}", unit="step")
    bar.update(step)
    perm, perm_epoch = None, -1
    try:
        while step < total:
            epoch, pos = divmod(step, steps_per_epoch)
            if epoch != perm_epoch:
                perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
                perm_epoch = epoch
            idx = perm[pos * cfg.batch_size:(pos + 1) * cfg.batch_size].tolist()
            torch.manual_seed(cfg.seed * 1_000_003 + step)
            for g, lr0 in zip(opt.param_groups, base_lrs):
                g["lr"] = lr0 * _lr_at(step, total, cfg)
            batch = student.tokenize([texts[i] for i in idx], cfg.max_length)
            loss = _loss(cfg, student, teacher, data, targets, idx, batch, rel)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in student.parameters() if p.requires_grad], 1.0)
            opt.step()
            step += 1
            losses.append((step, loss.item()))
            bar.set_postfix(loss=f"{losses[-1][1]:.4f}")
            bar.update(1)
            if step % cfg.save_every == 0 and step < total:
                save_checkpoint(ckpt, student, opt, step, cfg)
    finally:
        bar.close()
        for h in rel or ():
            h.remove()
    save_checkpoint(ckpt, student, opt, step, cfg)
    return step, losses
