"""`quantkit eval` on encoder classifiers: task accuracy (SST-2 dev by default) beside size,
latency and memory, in the same table, JSON and HTML report as the language models.

A classifier is a BERT-family directory with a classification head, as quantkit's
`distill finetune` / `distill kd` write it, fp32 or dynamic-int8 (`quantize-dynamic`). Every
model scores the same labelled examples (`label<TAB>text`, read by util.textdata's `read_labelled`)
with its own tokenizer, which must be the reference's (same vocabulary and ids), and its label
names must be the reference's, in the same order. Per model: accuracy against the gold labels
(with its binomial standard error); against the reference model (the first model unless --ref):
agreement of the predicted labels, KL divergence between the two label distributions (mean,
median, 99th percentile) and the mean change of the gold label's probability. Speed and memory
come from a fresh process per model (as for the language models): load time, batch-1 latency
per sentence (tokenization included), batch-32 throughput, peak RSS.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..util.errors import QuantkitError
from ..util.finite import check_logits
from ..util.machine import machine_info, vm_kib
from ..util.progress import progress
from ..util.textdata import read_labelled
from .options import EvalOptions
from .results import ClassifierRow, EvalResult, model_labels
from .speed import run_probe

TASK_ENV = "QUANTKIT_EVAL_TASK_DATA"
N_LATENCY = 8      # batch-1 sentences per latency run
N_THROUGHPUT = 32  # sentences of the batch-32 throughput run


def is_encoder_dir(path: str | None) -> bool:
    """A directory whose config.json names a BERT-family encoder (what quantkit's encoder tools read)."""
    if not path or not os.path.isdir(path):
        return False
    from ..models.encoder import ENCODER_MODEL_TYPES
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            return json.load(f).get("model_type") in ENCODER_MODEL_TYPES
    except (OSError, ValueError, AttributeError):
        return False


def default_task_data() -> str:
    from ..util.data import data_file
    return data_file("sst2/dev.tsv", env=TASK_ENV)


def task_name(path: str) -> str:
    """'sst2/dev.tsv' -> 'SST-2 dev' (what the table calls it); any other file by its name."""
    d, f = os.path.basename(os.path.dirname(os.path.abspath(path))), os.path.basename(path)
    if d.lower() in ("sst2", "sst-2") and f.lower().startswith("dev"):
        return "SST-2 dev"
    return f"{d}/{f}" if d else f


# ------------------------------------------------------------------------- sizes
@dataclass
class ClassifierFacts:
    n_params: int
    file_bytes: int
    linear_params: int
    linear_bytes: int
    types: dict[str, int]


_DTYPE_NAMES = {"F32": "f32", "F16": "f16", "BF16": "bf16", "I8": "i8", "I64": "i64", "I32": "i32"}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def describe_classifier(path: str) -> ClassifierFacts:
    """From the safetensors header alone: parameters (an int8 weight counts once; its per-row
    scales are overhead, counted in bytes only), bytes, and the encoder layers' 2-D weights."""
    from safetensors import safe_open
    weights = os.path.join(path, "model.safetensors")
    n_params = linear_params = linear_bytes = 0
    types: dict[str, int] = {}
    try:
        with safe_open(weights, "pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                shape, dtype = sl.get_shape(), sl.get_dtype()
                numel = int(np.prod(shape)) if shape else 1
                nbytes = numel * _ITEMSIZE.get(dtype, 4)
                t = _DTYPE_NAMES.get(dtype, dtype.lower())
                types[t] = types.get(t, 0) + 1
                is_scale = name.endswith(".weight_scale")
                if not is_scale and not name.endswith("position_ids"):
                    n_params += numel
                if name.startswith("encoder.layer.") and (len(shape) == 2 or is_scale):
                    linear_bytes += nbytes
                    if not is_scale:
                        linear_params += numel
    except Exception as e:  # noqa: BLE001 - a damaged file is the user's
        raise QuantkitError(f"cannot read safetensors ({type(e).__name__})", weights) from None
    from ..models.encoder import dir_size
    return ClassifierFacts(n_params=n_params, file_bytes=dir_size(path), linear_params=linear_params,
                           linear_bytes=linear_bytes, types=types)


# ------------------------------------------------------------------------- models
def open_classifier(path: str, n_threads: int):
    """An encoder with a classification head (fp32 or dynamic-int8), and its load time."""
    import torch

    from ..quant.dynamic import open_encoder
    torch.set_num_threads(n_threads)
    t0 = time.perf_counter()
    enc = open_encoder(path)
    load_s = time.perf_counter() - t0
    if not enc.meta.labels or enc.head is None:
        raise QuantkitError("not a classifier (no classification head)", path,
                            "fine-tune one with `quantkit distill finetune`, or evaluate language models")
    return enc, load_s


def _softmax64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=1, keepdims=True)


def score(logits: np.ndarray, ref_logits: np.ndarray, gold: np.ndarray) -> dict[str, Any]:
    """Accuracy and agreement with the reference for [n, n_labels] logits; gold = label indices."""
    n = len(gold)
    p, q = _softmax64(ref_logits), _softmax64(logits)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    kld = terms.sum(axis=1)
    pred = logits.argmax(axis=1)
    acc = float((pred == gold).mean())
    rows = np.arange(n)
    return {"n_examples": n, "accuracy": acc, "accuracy_stderr": (acc * (1 - acc) / n) ** 0.5,
            "kld_mean": float(kld.mean()), "kld_median": float(np.median(kld)),
            "kld_p99": float(np.percentile(kld, 99)),
            "kld_max": float(kld.max()), "top1_agreement": float((pred == ref_logits.argmax(axis=1)).mean()),
            "delta_p_mean": float((q[rows, gold] - p[rows, gold]).mean()),
            "ppl": None, "ppl_stderr": None}


# ------------------------------------------------------------------------- speed probe
def probe_classifier(path: str, sentences: list[str], runs: int, n_threads: int) -> dict[str, Any]:
    """Load time, batch-1 latency per sentence, batch-32 throughput, peak RSS; for a fresh process."""
    import transformers.models.bert.modeling_bert  # noqa: F401 - the runtime's import is not the model's load

    from ..quant import dynamic  # noqa: F401
    rss0 = vm_kib("VmRSS") * 1024
    enc, load_s = open_classifier(path, n_threads)
    one, many = sentences[:N_LATENCY], sentences[:N_THROUGHPUT]
    enc.predict(one[:1], batch_size=1)  # warm-up: first touch of the weights, kernel packing
    enc.predict(many, batch_size=len(many))
    lat, thr = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        for s in one:
            enc.predict([s], batch_size=1)
        lat.append((time.perf_counter() - t0) / len(one))
        t0 = time.perf_counter()
        enc.predict(many, batch_size=len(many))
        thr.append(len(many) / (time.perf_counter() - t0))
    return {"runtime": "torch", "threads": n_threads, "load_s": load_s, "runs": runs,
            "n_latency": len(one), "batch": len(many),
            "latency_ms": 1e3 * statistics.median(lat), "latency_ms_runs": [1e3 * x for x in lat],
            "sent_s": statistics.median(thr), "sent_s_runs": thr,
            "rss_before_load_bytes": rss0, "peak_rss_bytes": vm_kib("VmHWM") * 1024}


# ------------------------------------------------------------------------- evaluate
def evaluate_classifiers(paths: list[str], ref_spec: str | None, o: EvalOptions, n_threads: int) -> EvalResult:
    """The classifier branch of quantkit.eval.evaluate.evaluate (see the module docstring)."""
    import torch
    threads_before = torch.get_num_threads()
    try:
        return _evaluate_classifiers(paths, ref_spec, o, n_threads)
    finally:
        torch.set_num_threads(threads_before)


@dataclass
class Task:
    path: str            # the labelled data file
    texts: list[str]
    labels: list[str]    # the reference's label names, in its head's order
    gold: np.ndarray     # label index of each example


def read_task(data: str, labels: list[str], limit: int | None) -> Task:
    texts, gold_names = read_labelled(data, labels)
    if limit is not None:
        texts, gold_names = texts[:limit], gold_names[:limit]
    return Task(data, texts, labels, np.array([labels.index(y) for y in gold_names]))


def open_checked(p: str, ref_path: str, ref_vocab: list[str], labels: list[str], n_threads: int):
    """A classifier that shares the reference's tokenizer and labels, and its load time."""
    enc, load_s = open_classifier(p, n_threads)
    if enc.vocab() != ref_vocab:
        raise QuantkitError(f"tokenizer differs from the reference {os.path.basename(ref_path)} "
                            f"({len(enc.vocab())} vs {len(ref_vocab)} tokens)", p,
                            "classifiers are scored on the same token ids; compare models that share a tokenizer")
    if list(enc.meta.labels) != labels:
        raise QuantkitError(f"labels {enc.meta.labels} differ from the reference's {labels}", p,
                            "compare classifiers trained for the same task")
    return enc, load_s


def predict_all(enc, texts: list[str], batch_size: int, bar) -> np.ndarray:
    """The head's logits [n, n_labels] (float32) for every text, in batches."""
    import torch
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            out.append(enc.predict(texts[i:i + batch_size], batch_size=batch_size).float().numpy())
            if bar:
                bar.update(1)
    return np.concatenate(out).astype(np.float32)


def score_classifiers(order: list[str], ref, task: Task, o: EvalOptions, n_threads: int) -> list[ClassifierRow]:
    """Each classifier of ORDER (the reference first; `ref` = (encoder, load time)) on the task."""
    ref_enc, ref_load_s = ref
    ref_vocab = ref_enc.vocab()
    n_batches = -(-len(task.texts) // o.batch_size)
    bar = progress(total=n_batches * len(order), desc="eval", unit="batch") if o.show_progress else None
    rows: list[ClassifierRow] = []
    ref_logits = None
    try:
        for p in order:
            t0 = time.perf_counter()
            if p == order[0]:
                enc, load_s = ref_enc, ref_load_s
            else:
                enc, load_s = open_checked(p, order[0], ref_vocab, task.labels, n_threads)
            if bar:
                bar.set_description(f"eval {os.path.basename(os.path.normpath(p))}")
            logits = predict_all(enc, task.texts, o.batch_size, bar)
            check_logits(logits, p, f"on {len(task.texts)} texts of {os.path.basename(task.path)}")
            if ref_logits is None:
                ref_logits = logits
            rows.append(ClassifierRow(path=p, runtime="torch", is_reference=p == order[0],
                                      eval_s=time.perf_counter() - t0, eval_load_s=load_s,
                                      quantization=(enc.meta.quantization or {}).get("method"),
                                      n_layers=enc.num_layers, **score(logits, ref_logits, task.gold)))
            del enc
    finally:
        if bar:
            bar.close()
    return rows


def _evaluate_classifiers(paths: list[str], ref_spec: str | None, o: EvalOptions, n_threads: int) -> EvalResult:
    t_start = time.perf_counter()
    data = o.task_data or default_task_data()
    if o.task_limit is not None and o.task_limit < 1:
        raise QuantkitError(f"--task-limit {o.task_limit}: give a positive number of examples")
    if ref_spec is not None:
        ref_path, ref_how = ref_spec, "given (--ref)"
    else:
        ref_path = paths[0]
        ref_how = "the first model"
    order = [ref_path] + [p for p in dict.fromkeys(paths) if p != ref_path]

    ref_enc, ref_load_s = open_classifier(ref_path, n_threads)
    task = read_task(data, list(ref_enc.meta.labels), o.task_limit)
    if ref_enc.meta.quantization:
        ref_how += f" ({ref_enc.meta.quantization.get('method')})"
    rows = score_classifiers(order, (ref_enc, ref_load_s), task, o, n_threads)
    del ref_enc
    timings: dict[str, Any] = {"quality_s": time.perf_counter() - t_start}

    for r, name in zip(rows, model_labels([r.path for r in rows])):
        f = describe_classifier(r.path)
        r.set_size(name, f.file_bytes, f.n_params, f.types, f.linear_params, f.linear_bytes)
    if o.speed:
        for r in (progress(rows, desc="speed", unit="model") if o.show_progress else rows):
            r.speed = run_probe(r.path, task.texts[:N_THROUGHPUT], 0, o.speed_runs, n_threads, kind="classifier")
    timings["total_s"] = time.perf_counter() - t_start
    meta = classifier_meta(task, ref_path, ref_how, o, n_threads)
    meta.update(timings=timings, machine=machine_info(n_threads))
    return EvalResult(rows, meta)


def classifier_meta(task: Task, ref_path: str, ref_how: str, o: EvalOptions, n_threads: int) -> dict[str, Any]:
    import torch
    import transformers
    name, data, labels = task_name(task.path), task.path, task.labels
    return {
        "kind": "classifier",
        "task": name,
        "protocol": (f"classification accuracy on {name}: {len(task.texts)} labelled examples "
                     f"({os.path.basename(data)}{', first ' + str(o.task_limit) if o.task_limit else ''}), "
                     f"labels {labels}; each model's argmax against the gold label; batches of {o.batch_size}, "
                     f"padded, fp32 activations (int8 kernels quantize them per row)"),
        "reference": ref_path, "reference_how": ref_how,
        "reference_runtime": f"torch ({torch.__version__}, transformers {transformers.__version__})",
        "tokenizer": "each model's own WordPiece tokenizer, checked identical to the reference's",
        "text": os.path.abspath(data), "n_examples": len(task.texts), "labels": labels, "threads": n_threads,
        "metrics": {"accuracy": "share of examples whose predicted label is the gold label "
                                "(± binomial standard error)",
                    "top1_agreement": "share of examples where the model predicts the reference's label",
                    "kld": "KL(reference || model) of the label distributions (softmax of the head), natural log; "
                           "mean, median, 99th percentile",
                    "delta_p": "p_model(gold label) - p_reference(gold label), mean"},
        "speed": (f"fresh subprocess per model: load; batch-1 latency per sentence over the first {N_LATENCY} "
                  f"examples (tokenization included); throughput of one batch of {N_THROUGHPUT}; median of "
                  f"{o.speed_runs} runs after one warm-up; {n_threads} thread(s); peak RSS = VmHWM of that process "
                  f"(RSS before loading, torch and transformers imported, stated)") if o.speed else None,
    }
