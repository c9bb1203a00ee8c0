"""Data augmentation for task distillation (Tang et al. 2019, "Distilling Task-Specific
Knowledge from BERT into Simple Neural Networks"): new unlabelled sentences that the teacher
then labels.

Per word: with probability p_unk it becomes [UNK]; otherwise with probability p_replace it is
replaced by another word of the same word class. Then, with probability p_span, the sample is
cut down to a random sub-span of 1..max_span words.

Word classes instead of a part-of-speech tagger (none ships with quantkit's dependencies):
classes are induced from the training text itself by distributional clustering (Schuetze
1995; Clark 2000): each word of count >= min_count is described by the counts of its left and
right neighbours among the n_context most frequent words (mostly function words, which is what
makes the clusters syntactic), log-scaled and L2-normalised, then spherical k-means groups the
words into n_classes classes. On SST-2 this puts adjectives, nouns, verbs-ing, adverbs etc.
largely apart; a replacement word is drawn uniformly from its class. Rare words are not
replaced.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

UNK = "[UNK]"
BOUNDARY = "<s>"


@dataclass
class AugmentConfig:
    p_unk: float = 0.1
    p_replace: float = 0.1
    p_span: float = 0.25
    max_span: int = 5
    n_classes: int = 64
    min_count: int = 5


class WordClasses:
    def __init__(self, word_class: dict[str, int]):
        self.word_class = word_class
        self.members: dict[int, list[str]] = {}
        for w, c in word_class.items():
            self.members.setdefault(c, []).append(w)
        for m in self.members.values():
            m.sort()

    @classmethod
    def from_corpus(cls, sentences: list[str], n_classes: int = 64, n_context: int = 200,
                    min_count: int = 5, iters: int = 15, seed: int = 0) -> "WordClasses":
        toks = [s.lower().split() for s in sentences]
        counts = Counter(w for t in toks for w in t)
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        if not words:
            return cls({})
        ctx = [BOUNDARY] + [w for w, _ in counts.most_common(n_context)]
        ci = {w: i for i, w in enumerate(ctx)}
        wi = {w: i for i, w in enumerate(words)}
        feats = np.zeros((len(words), 2 * len(ctx)), dtype=np.float32)
        for t in toks:
            padded = [BOUNDARY] + t + [BOUNDARY]
            for j in range(1, len(padded) - 1):
                r = wi.get(padded[j])
                if r is None:
                    continue
                left, right = ci.get(padded[j - 1]), ci.get(padded[j + 1])
                if left is not None:
                    feats[r, left] += 1
                if right is not None:
                    feats[r, len(ctx) + right] += 1
        feats = np.log1p(feats)
        feats /= np.linalg.norm(feats, axis=1, keepdims=True).clip(min=1e-9)
        k = min(n_classes, len(words))
        rng = np.random.default_rng(seed)
        centers = feats[rng.choice(len(words), size=k, replace=False)]
        assign = np.zeros(len(words), dtype=np.int64)
        for _ in range(iters):
            assign = (feats @ centers.T).argmax(1)
            for c in range(k):
                members = feats[assign == c]
                if len(members):
                    v = members.sum(0)
                    centers[c] = v / max(np.linalg.norm(v), 1e-9)
        return cls({w: int(c) for w, c in zip(words, assign)})

    def replacement(self, word: str, rng: random.Random) -> str:
        c = self.word_class.get(word.lower())
        if c is None or len(self.members[c]) < 2:
            return word
        while True:
            w = rng.choice(self.members[c])
            if w != word.lower():
                return w

    def to_json(self) -> str:
        return json.dumps(self.word_class, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "WordClasses":
        return cls({str(k): int(v) for k, v in json.loads(text).items()})


def augment_sentence(sentence: str, rng: random.Random, cfg: AugmentConfig, classes: WordClasses) -> str:
    out = []
    for w in sentence.split():
        u = rng.random()
        if u < cfg.p_unk:
            out.append(UNK)
        elif u < cfg.p_unk + cfg.p_replace:
            out.append(classes.replacement(w, rng))
        else:
            out.append(w)
    if out and rng.random() < cfg.p_span:
        n = rng.randint(1, min(cfg.max_span, len(out)))
        start = rng.randint(0, len(out) - n)
        out = out[start:start + n]
    return " ".join(out)


def augment_corpus(sentences: list[str], n_per_sentence: int, cfg: AugmentConfig,
                   classes: WordClasses, seed: int = 0) -> list[str]:
    """n_per_sentence new samples per sentence, without duplicates of each other or the input."""
    rng = random.Random(seed)
    seen = set(sentences)
    out = []
    for s in sentences:
        for _ in range(n_per_sentence):
            a = augment_sentence(s, rng, cfg, classes)
            if a and a not in seen:
                seen.add(a)
                out.append(a)
    return out


def config_dict(cfg: AugmentConfig) -> dict:
    return asdict(cfg)
