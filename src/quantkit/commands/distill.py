"""`quantkit distill {finetune,kd,embed}`: train small encoders from big ones.

    quantkit distill finetune --train sst2/train.tsv --dev sst2/dev.tsv -o teacher/
    quantkit distill kd --teacher teacher/ --train sst2/train.tsv --num-layers 3 --augment 2 -o student/
    quantkit distill kd --teacher teacher/ --train sst2/train.tsv --student-arch bow --augment 4 --epochs 10 -o bow/
    quantkit distill embed --text wikitext-2/valid.txt --num-layers 3 -o minilm-l3/

Flags mirror quantkit.distill.trainer.DistillConfig. Checkpoints go to OUT.ckpt (atomic,
every --save-every steps); --resume continues an interrupted run with the same options.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..util import validate as v
from ..util.errors import QuantkitError

MAX_LAYERS = 1024            # layers, heads of a BERT-family encoder
MAX_WIDTH = 65536            # hidden size, tokens per sentence, batch size
MAX_COUNT = 1_000_000_000    # examples, steps


def _layers(text: str, name: str = "") -> list[int]:
    """--layers 0,2,4: layer numbers from 0 to MAX_LAYERS - 1, at least one."""
    v.as_str(text, name, max_len=10_000, hint="give comma-separated layer numbers, e.g. 0,2,4")
    out = [v.as_int(x, "layer", 0, MAX_LAYERS - 1, hint="give comma-separated layer numbers, e.g. 0,2,4")
           for x in text.split(",") if x.strip()]
    if not out:
        v.fail(name, text, "names no layer", "give comma-separated layer numbers, e.g. 0,2,4")
    return out


def _common(p: argparse.ArgumentParser, teacher_flag: str) -> None:
    if teacher_flag == "--model":
        p.add_argument("--model", dest="teacher", default=None, type=v.str_arg(),
                       help="encoder to fine-tune (default: bundled all-MiniLM-L6-v2)")
    else:
        p.add_argument("--teacher", default=None, required=teacher_flag == "--teacher!", type=v.str_arg(),
                       help="teacher encoder directory" + ("" if teacher_flag == "--teacher!" else
                                                           " (default: bundled all-MiniLM-L6-v2)"))
    p.add_argument("-o", "--output", required=True, help="output directory")
    s = p.add_argument_group("student shape")
    if teacher_flag != "--model":
        s.add_argument("--student", default=None, type=v.str_arg(), help="start from this encoder (same vocabulary as the teacher)")
    s.add_argument("--num-layers", type=v.int_arg(1, MAX_LAYERS), default=None, help="layers, taken evenly from the teacher")
    s.add_argument("--layers", type=v.arg(_layers), default=None, help="exactly these teacher layers, e.g. 0,2,4")
    s.add_argument("--hidden", type=v.int_arg(1, MAX_WIDTH), default=None, help="a fresh, narrower student of this hidden size")
    if teacher_flag != "--teacher":        # finetune and kd: classifiers
        s.add_argument("--student-arch", choices=("bert", "bow", "cnn"), default="bert",
                       help="bert (default), or the fastest students: bow (bag of n-grams) / cnn, which read "
                            "text through the teacher's tokenizer and train at --head-lr")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=v.float_arg(0, 10_000, lo_open=True), default=1.0)
    t.add_argument("--max-steps", type=v.int_arg(1, MAX_COUNT), default=None)
    t.add_argument("--batch-size", type=v.int_arg(1, MAX_WIDTH), default=32)
    t.add_argument("--lr", type=v.float_arg(0, 10, lo_open=True), default=5e-5)
    t.add_argument("--head-lr", type=v.float_arg(0, 10, lo_open=True), default=1e-3,
                   help="learning rate of a new classification head (and of a whole bow/cnn student)")
    t.add_argument("--max-length", type=v.int_arg(2, MAX_WIDTH), default=64, help="tokens per sentence")
    t.add_argument("--train-word-embeddings", action="store_true",
                   help="also update the word-embedding table (frozen by default)")
    t.add_argument("--limit", type=v.int_arg(1, MAX_COUNT), default=None, help="use a seeded sample of this many examples")
    t.add_argument("--seed", type=v.int_arg(0, 2**32 - 1), default=0)
    t.add_argument("--dev-limit", type=v.int_arg(1, MAX_COUNT), default=None, help="evaluate on the first N dev examples")
    t.add_argument("--checkpoint-dir", default=None, type=v.str_arg(), help="default OUTPUT.ckpt")
    t.add_argument("--save-every", type=v.int_arg(1, MAX_COUNT), default=200, help="checkpoint every N steps")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    t.add_argument("--json", action="store_true", help="print the summary as JSON")


def register(sub) -> None:
    p = sub.add_parser("distill", help="fine-tune and distil BERT-family encoders (classifiers, sentence embeddings)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = p.add_subparsers(dest="objective", metavar="OBJECTIVE")
    f = modes.add_parser("finetune", help="train a classifier on gold labels (a teacher, or a baseline student)")
    f.add_argument("--train", required=True, type=v.str_arg(), help="label<TAB>text file")
    f.add_argument("--dev", default=None, type=v.str_arg(), help="label<TAB>text file for accuracy")
    _common(f, "--model")
    k = modes.add_parser("kd", help="soft+hard label distillation from a classifier teacher")
    k.add_argument("--train", required=True, type=v.str_arg(), help="label<TAB>text file")
    k.add_argument("--dev", default=None, type=v.str_arg(), help="label<TAB>text file for accuracy")
    _common(k, "--teacher!")
    k.add_argument("--temperature", type=v.float_arg(0, 1000, lo_open=True), default=2.0)
    k.add_argument("--alpha", type=v.arg(v.fraction), default=0.5, help="weight of the soft (teacher) term")
    k.add_argument("--relation-weight", type=v.float_arg(0, 1e6), default=0.0, help="MiniLMv2 Q/K/V relation loss weight")
    k.add_argument("--relation-heads", type=v.int_arg(1, MAX_LAYERS), default=12)
    k.add_argument("--relation-layer", type=v.int_arg(-MAX_LAYERS, MAX_LAYERS - 1), default=-1, help="teacher layer for relations")
    k.add_argument("--augment", type=v.int_arg(0, 100), default=0, help="augmented sentences per training sentence")
    k.add_argument("--p-unk", type=v.arg(v.fraction), default=0.1)
    k.add_argument("--p-replace", type=v.arg(v.fraction), default=0.1)
    k.add_argument("--p-span", type=v.arg(v.fraction), default=0.25)
    e = modes.add_parser("embed", help="match the teacher's sentence embeddings (MSE) on unlabelled text")
    e.add_argument("--text", dest="train", required=True, type=v.str_arg(), help="UTF-8 text, one sentence/paragraph per line")
    e.add_argument("--dev-text", dest="dev", default=None, type=v.str_arg(), help="held-out text for the cosine to the teacher")
    _common(e, "--teacher")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..api import distill
    from ..distill.trainer import DistillConfig

    if not getattr(args, "objective", None):
        raise QuantkitError("choose an objective: finetune, kd or embed", None, "see quantkit distill --help")
    fields = set(DistillConfig.__dataclass_fields__)
    kwargs = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    summary = distill(**kwargs)
    summary.pop("losses", None)
    if getattr(args, "json", False):
        print(json.dumps(summary, indent=2))
        return 0
    shape = (f"{summary['student_arch']} student, dim {summary['hidden']}" if "student_arch" in summary
             else f"{summary['student_layers']} layers x {summary['hidden']}")
    line = (f"wrote {summary['output']}: {summary['objective']}, {summary['steps']} steps, "
            f"{shape}, {summary['parameters'] / 1e6:.1f}M parameters, "
            f"loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}, {summary['seconds']:.0f} s")
    if "dev_accuracy" in summary:
        line += f", dev accuracy {summary['dev_accuracy']:.4f}"
        if "teacher_dev_accuracy" in summary:
            line += f" (teacher {summary['teacher_dev_accuracy']:.4f})"
    if "dev_cosine" in summary:
        line += f", dev cosine to teacher {summary['dev_cosine']:.4f}"
        if "dev_cosine_initial" in summary:
            line += f" (before training {summary['dev_cosine_initial']:.4f})"
    print(line, file=sys.stdout)
    return 0
