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

from ..util.errors import QuantkitError


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}") from None


def _common(p: argparse.ArgumentParser, teacher_flag: str) -> None:
    if teacher_flag == "--model":
        p.add_argument("--model", dest="teacher", default=None,
                       help="encoder to fine-tune (default: bundled all-MiniLM-L6-v2)")
    else:
        p.add_argument("--teacher", default=None, required=teacher_flag == "--teacher!",
                       help="teacher encoder directory" + ("" if teacher_flag == "--teacher!" else
                                                           " (default: bundled all-MiniLM-L6-v2)"))
    p.add_argument("-o", "--output", required=True, help="output directory")
    s = p.add_argument_group("student shape")
    if teacher_flag != "--model":
        s.add_argument("--student", default=None, help="start from this encoder (same vocabulary as the teacher)")
    s.add_argument("--num-layers", type=int, default=None, help="layers, taken evenly from the teacher")
    s.add_argument("--layers", type=_layers, default=None, help="exactly these teacher layers, e.g. 0,2,4")
    s.add_argument("--hidden", type=int, default=None, help="a fresh, narrower student of this hidden size")
    if teacher_flag != "--teacher":        # finetune and kd: classifiers
        s.add_argument("--student-arch", choices=("bert", "bow", "cnn"), default="bert",
                       help="bert (default), or the fastest students: bow (bag of n-grams) / cnn, which read "
                            "text through the teacher's tokenizer and train at --head-lr")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--max-steps", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=5e-5)
    t.add_argument("--head-lr", type=float, default=1e-3,
                   help="learning rate of a new classification head (and of a whole bow/cnn student)")
    t.add_argument("--max-length", type=int, default=64, help="tokens per sentence")
    t.add_argument("--train-word-embeddings", action="store_true",
                   help="also update the word-embedding table (frozen by default)")
    t.add_argument("--limit", type=int, default=None, help="use a seeded sample of this many examples")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--dev-limit", type=int, default=None, help="evaluate on the first N dev examples")
    t.add_argument("--checkpoint-dir", default=None, help="default OUTPUT.ckpt")
    t.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    t.add_argument("--json", action="store_true", help="print the summary as JSON")


def register(sub) -> None:
    p = sub.add_parser("distill", help="fine-tune and distil BERT-family encoders (classifiers, sentence embeddings)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = p.add_subparsers(dest="objective", metavar="OBJECTIVE")
    f = modes.add_parser("finetune", help="train a classifier on gold labels (a teacher, or a baseline student)")
    f.add_argument("--train", required=True, help="label<TAB>text file")
    f.add_argument("--dev", default=None, help="label<TAB>text file for accuracy")
    _common(f, "--model")
    k = modes.add_parser("kd", help="soft+hard label distillation from a classifier teacher")
    k.add_argument("--train", required=True, help="label<TAB>text file")
    k.add_argument("--dev", default=None, help="label<TAB>text file for accuracy")
    _common(k, "--teacher!")
    k.add_argument("--temperature", type=float, default=2.0)
    k.add_argument("--alpha", type=float, default=0.5, help="weight of the soft (teacher) term")
    k.add_argument("--relation-weight", type=float, default=0.0, help="MiniLMv2 Q/K/V relation loss weight")
    k.add_argument("--relation-heads", type=int, default=12)
    k.add_argument("--relation-layer", type=int, default=-1, help="teacher layer for relations")
    k.add_argument("--augment", type=int, default=0, help="augmented sentences per training sentence")
    k.add_argument("--p-unk", type=float, default=0.1)
    k.add_argument("--p-replace", type=float, default=0.1)
    k.add_argument("--p-span", type=float, default=0.25)
    e = modes.add_parser("embed", help="match the teacher's sentence embeddings (MSE) on unlabelled text")
    e.add_argument("--text", dest="train", required=True, help="UTF-8 text, one sentence/paragraph per line")
    e.add_argument("--dev-text", dest="dev", default=None, help="held-out text for the cosine to the teacher")
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
