"""Distillation: losses, augmentation, data checks, and short real training runs.

The training tests run the same code as the benchmarks on a few hundred SST-2 examples:
they assert that the loss falls and that the model beats chance (50% on balanced SST-2 dev)
by a stated margin.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from quantkit.distill import augment as A
from quantkit.distill.losses import IGNORE, kd_loss, minilmv2_loss, relation_loss
from quantkit.distill.trainer import DistillConfig, distill, evenly_spaced
from quantkit.util.errors import QuantkitError
from quantkit.util.textdata import read_labelled

from helpers.encoders import save_tiny_bert

pytestmark = pytest.mark.usefixtures("one_thread")
from quantkit.util.data import DATA_DIR

DATA = Path(DATA_DIR)
SST2 = DATA / "sst2"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("QUANTKIT_QUIET", "1")


# ---- losses ---------------------------------------------------------------------------
def test_kd_loss_terms():
    torch.manual_seed(0)
    s, t = torch.randn(8, 3), torch.randn(8, 3)
    y = torch.randint(0, 3, (8,))
    ce = torch.nn.functional.cross_entropy(s, y)
    assert torch.allclose(kd_loss(s, t, y, 2.0, alpha=0.0), ce)
    assert kd_loss(t, t, None, 3.0).abs() < 1e-6                 # KL of equal distributions
    assert kd_loss(s, t, None, 1.0) > 0
    # augmented rows (IGNORE) carry only the soft term
    y_aug = torch.full((8,), IGNORE)
    assert torch.allclose(kd_loss(s, t, y_aug, 2.0, 0.5), kd_loss(s, t, None, 2.0))
    s.requires_grad_(True)
    kd_loss(s, t, y).backward()
    assert s.grad.abs().sum() > 0


def test_relation_loss():
    torch.manual_seed(0)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    t = torch.randn(2, 5, 24)
    assert relation_loss(t, t, mask, 4).abs() < 1e-5
    s = torch.randn(2, 5, 12, requires_grad=True)            # student narrower than teacher
    loss = minilmv2_loss([s, s, s], [t, t, t], mask, 4)
    assert loss > 0
    loss.backward()
    assert s.grad.abs().sum() > 0
    # padded keys and queries do not matter
    t2 = t.clone()
    t2[1, 3:] = 100
    assert torch.allclose(relation_loss(s, t, mask, 4), relation_loss(s, t2, mask, 4))
    with pytest.raises(ValueError):
        relation_loss(s, t, mask, 5)


# ---- augmentation ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def sst_texts():
    texts, _ = read_labelled(str(SST2 / "train.tsv"))
    return texts[:4000]


def test_word_classes_and_augment(sst_texts):
    wc = A.WordClasses.from_corpus(sst_texts, n_classes=32, min_count=5)
    assert len(wc.word_class) > 300 and len(wc.members) > 10
    # determinism and serialisation
    assert A.WordClasses.from_corpus(sst_texts, n_classes=32, min_count=5).word_class == wc.word_class
    assert A.WordClasses.from_json(wc.to_json()).word_class == wc.word_class
    rng = random.Random(0)
    for w in ["good", "film", "the", "funny"]:
        r = wc.replacement(w, rng)
        assert r != w and wc.word_class[r] == wc.word_class[w]
    assert wc.replacement("zzzunseen", rng) == "zzzunseen"
    s = "a gorgeous , witty , seductive movie"
    assert A.augment_sentence(s, rng, A.AugmentConfig(p_unk=1.0, p_span=0.0), wc) == " ".join([A.UNK] * 7)
    assert A.augment_sentence(s, rng, A.AugmentConfig(p_unk=0, p_replace=0, p_span=0), wc) == s
    for _ in range(20):
        out = A.augment_sentence(s, rng, A.AugmentConfig(p_unk=0, p_replace=0, p_span=1.0, max_span=3), wc)
        assert 1 <= len(out.split()) <= 3 and out in s
    aug = A.augment_corpus(sst_texts[:50], 3, A.AugmentConfig(), wc, seed=1)
    assert len(aug) == len(set(aug)) and not set(aug) & set(sst_texts[:50]) and len(aug) > 50
    assert aug == A.augment_corpus(sst_texts[:50], 3, A.AugmentConfig(), wc, seed=1)


# ---- data errors ----------------------------------------------------------------------
def test_labels_file_errors(tmp_path):
    p = tmp_path / "t.tsv"
    p.write_text("label\tsentence\n1\tgreat\n0\tawful\n")
    assert read_labelled(str(p)) == (["great", "awful"], ["1", "0"])
    p.write_text("1\tgreat\n0 awful and no tab\n")
    with pytest.raises(QuantkitError, match="line 2: expected 'label<TAB>text'"):
        read_labelled(str(p))
    p.write_text("1\tgreat\n\n2\tmeh\n")
    with pytest.raises(QuantkitError, match="line 3: unknown label '2'"):
        read_labelled(str(p), ["0", "1"])
    p.write_text("label\tsentence\n")
    with pytest.raises(QuantkitError, match="no examples"):
        read_labelled(str(p))
    with pytest.raises(QuantkitError, match="no such"):
        read_labelled(str(tmp_path / "nope.tsv"))
    assert evenly_spaced(6, 3) == [0, 2, 4]


# ---- training -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dev_file(tmp_path_factory):
    lines = (SST2 / "dev.tsv").read_text().splitlines()
    p = tmp_path_factory.mktemp("dev") / "dev200.tsv"
    p.write_text("\n".join(lines[:201]) + "\n")          # header + 200 examples
    return p


def _falls(losses, k=3):
    vals = [v for _, v in losses]
    return sum(vals[-k:]) / k < sum(vals[:k]) / k


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, dev_file):
    out = tmp_path_factory.mktemp("t") / "teacher"
    # a 2-layer teacher cut from MiniLM keeps the test inside its CPU budget; the benchmark
    # fine-tunes all 6 layers on all of SST-2
    s = distill(DistillConfig(objective="finetune", train=str(SST2 / "train.tsv"), dev=str(dev_file),
                              output=str(out), num_layers=2, limit=256, max_steps=16, batch_size=16,
                              lr=1e-4, head_lr=1e-2, max_length=24, save_every=1000))
    return out, s


def test_finetune_teacher_learns(teacher):
    out, s = teacher
    assert _falls(s["losses"])
    assert s["dev_accuracy"] >= 0.65, s["dev_accuracy"]       # chance + 15 points
    assert (out / "model.safetensors").exists() and Path(s["checkpoint"], "state.json").exists()


def test_kd_student_with_relations_and_augmentation(teacher, dev_file, tmp_path):
    t_dir, t_sum = teacher
    s = distill(DistillConfig(objective="kd", teacher=str(t_dir), train=str(SST2 / "train.tsv"),
                              dev=str(dev_file), output=str(tmp_path / "student"), num_layers=1,
                              relation_weight=1.0, relation_heads=6, augment=1, limit=128, max_steps=8,
                              batch_size=16, lr=1e-4, head_lr=1e-2, max_length=24))
    assert s["student_layers"] == 1 and s["augmented"] > 60
    assert s["parameters"] < t_sum["parameters"]
    assert _falls(s["losses"])
    assert s["dev_accuracy"] >= 0.6, s["dev_accuracy"]        # chance + 10 points
    from quantkit.api import load_encoder
    st = load_encoder(tmp_path / "student")
    assert st.num_layers == 1 and st.meta.labels == ["0", "1"]
    assert st.meta.history[-1]["objective"] == "kd"


def test_embedding_distillation(tmp_path):
    s = distill(DistillConfig(objective="embed", train=str(DATA / "wikitext-2" / "valid.txt"),
                              dev=str(DATA / "wikitext-2" / "test.txt"), output=str(tmp_path / "emb"),
                              num_layers=1, limit=96, max_steps=6, batch_size=16, lr=2e-4, max_length=24,
                              dev_limit=32))
    assert _falls(s["losses"], 2)
    assert s["dev_cosine"] > s["dev_cosine_initial"] + 0.05, (s["dev_cosine_initial"], s["dev_cosine"])


# ---- resume and bad input (tiny random BERT: fast) ------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny") / "tiny-bert", labels=["0", "1"])


def _tiny_cfg(tiny_dir, out, **kw):
    return DistillConfig(**{"objective": "finetune", "teacher": str(tiny_dir), "train": str(SST2 / "train.tsv"),
                            "output": str(out), "limit": 64, "max_steps": 4, "batch_size": 16,
                            "lr": 1e-3, "max_length": 16, "save_every": 2, **kw})


def test_resume_continues_the_same_trajectory(tiny_dir, tmp_path, monkeypatch):
    from quantkit.api import load_encoder
    from quantkit.distill import trainer

    ref = distill(_tiny_cfg(tiny_dir, tmp_path / "a"))
    real_save = trainer.save_checkpoint

    def save_then_die(path, student, opt, step, cfg):
        real_save(path, student, opt, step, cfg)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        distill(_tiny_cfg(tiny_dir, tmp_path / "b"))
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    assert not (tmp_path / "b").exists() and (tmp_path / "b.ckpt" / "state.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    res = distill(_tiny_cfg(tiny_dir, tmp_path / "b", resume=True))
    assert [l for l in res["losses"]] == ref["losses"][2:]
    a, b = load_encoder(tmp_path / "a"), load_encoder(tmp_path / "b")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-6), k
    with pytest.raises(QuantkitError, match="different settings"):
        distill(_tiny_cfg(tiny_dir, tmp_path / "b", resume=True, lr=5e-4))
    with pytest.raises(QuantkitError, match="no checkpoint"):
        distill(_tiny_cfg(tiny_dir, tmp_path / "c", resume=True))


def test_bad_inputs(tiny_dir, tmp_path):
    from tokenizers.implementations import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel

    from quantkit.models.encoder import Encoder, EncoderMeta, save_encoder

    # a student with another vocabulary
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film"]) + "\n")
    tok = BertWordPieceTokenizer(str(vocab), lowercase=True)._tokenizer
    other = Encoder(BertModel(BertConfig(vocab_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64), add_pooling_layer=False), tok, EncoderMeta(), None)
    other_dir = save_encoder(other, tmp_path / "other")
    with pytest.raises(QuantkitError, match="vocabularies are incompatible"):
        distill(_tiny_cfg(tiny_dir, tmp_path / "o", objective="kd", student=other_dir))
    # a labels file with a label the teacher does not know, and a malformed line
    bad = tmp_path / "bad.tsv"
    bad.write_text("label\tsentence\n1\tfine\n7\tstrange\n")
    with pytest.raises(QuantkitError, match="line 3: unknown label '7'"):
        distill(_tiny_cfg(tiny_dir, tmp_path / "o", objective="kd", train=str(bad)))
    bad.write_text("1\tfine\n0\ttoo\tmany tabs\n")
    with pytest.raises(QuantkitError, match="line 2"):
        distill(_tiny_cfg(tiny_dir, tmp_path / "o", train=str(bad)))
    # a teacher that is not an encoder, or has no head for kd
    (tmp_path / "dec").mkdir()
    (tmp_path / "dec" / "config.json").write_text('{"model_type": "gemma3"}')
    with pytest.raises(QuantkitError, match="not an encoder"):
        distill(_tiny_cfg(tmp_path / "dec", tmp_path / "o", objective="kd"))
    with pytest.raises(QuantkitError, match="no classification head"):
        distill(_tiny_cfg(tiny_dir, tmp_path / "o", objective="kd", teacher=other_dir))
    assert not (tmp_path / "o").exists()


def test_cli(tiny_dir, tmp_path, capsys):
    from quantkit.cli import main

    rc = main(["-q", "distill", "finetune", "--model", str(tiny_dir), "--train", str(SST2 / "train.tsv"),
               "--limit", "32", "--max-steps", "2", "--batch-size", "16", "--max-length", "16",
               "-o", str(tmp_path / "ft")])
    assert rc == 0 and "wrote" in capsys.readouterr().out
    bad = tmp_path / "bad.tsv"
    bad.write_text("1\tok\nnot a line\n")
    rc = main(["-q", "distill", "kd", "--teacher", str(tmp_path / "ft"), "--train", str(bad), "-o", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert rc == 2 and "line 2" in err and "Traceback" not in err


# ---- the fastest students: bag of n-grams, CNN (data distillation) ----------------------
def test_bow_student_learns_from_a_few_hundred_gold_examples(tmp_path):
    from quantkit.distill.fast_student import load_fast_student
    s = distill(DistillConfig(objective="finetune", student_arch="bow", train=str(SST2 / "train.tsv"),
                              dev=str(SST2 / "dev.tsv"), output=str(tmp_path / "bow"), limit=400, epochs=10,
                              head_lr=3e-3))
    assert s["steps"] == 130 and s["student_arch"] == "bow"
    assert _falls(s["losses"]) and s["last_loss"] < s["first_loss"] / 2
    # all 872 dev sentences; majority class is 50.9%. Measured 0.641 (seed 0), 0.617 (seed 1)
    assert s["dev_accuracy"] >= 0.58, s["dev_accuracy"]
    m = load_fast_student(tmp_path / "bow")
    texts, _ = read_labelled(str(SST2 / "dev.tsv"))
    assert m.labels == ["0", "1"] and m.predict(texts[:5]).shape == (5, 2)


@pytest.mark.parametrize("arch", ["bow", "cnn"])
def test_fast_student_kd_on_teacher_labelled_augmented_data(arch, teacher, dev_file, tmp_path):
    from quantkit.distill.fast_student import load_fast_student
    t_dir, t_sum = teacher
    s = distill(DistillConfig(objective="kd", student_arch=arch, teacher=str(t_dir), train=str(SST2 / "train.tsv"),
                              dev=str(dev_file), output=str(tmp_path / arch), limit=300, augment=2, epochs=6,
                              head_lr=3e-3, max_length=24))
    assert s["examples"] == 300 and s["augmented"] > 250          # teacher-labelled (duplicates dropped)
    assert _falls(s["losses"])
    assert s["parameters"] < t_sum["parameters"] / 2
    # dev200 (about half positive): chance + 5 points. Measured bow 0.585, cnn 0.61 from this
    # 2-layer teacher (0.72) on 300 gold + ~340 augmented sentences; the benchmark's full-size
    # run is in BENCHMARKS.md
    assert s["dev_accuracy"] >= 0.55, s["dev_accuracy"]
    from quantkit.distill.fast_student import accuracy as fast_accuracy
    m = load_fast_student(tmp_path / arch)                         # saved, loads, same predictions
    assert m.shape.arch == arch
    assert fast_accuracy(m, *read_labelled(str(dev_file))) == s["dev_accuracy"]


def test_fast_student_bad_input(teacher, tmp_path):
    t_dir, _ = teacher
    base = dict(objective="kd", teacher=str(t_dir), train=str(SST2 / "train.tsv"), output=str(tmp_path / "x"))
    with pytest.raises(QuantkitError, match="unknown student architecture 'lstm'"):
        distill(DistillConfig(**base, student_arch="lstm"))
    with pytest.raises(QuantkitError, match="describe BERT students"):
        distill(DistillConfig(**base, student_arch="bow", num_layers=2))
    with pytest.raises(QuantkitError, match="not a bow/cnn student"):
        from quantkit.distill.fast_student import load_fast_student
        load_fast_student(t_dir)
