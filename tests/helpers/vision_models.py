"""Tiny random vision-language models built from configs (nothing downloaded): a LLaVA (CLIP
tower, MLP projector, llama language model) and a Gemma-3 with its SigLIP tower, each with a
byte-level BPE tokenizer trained offline that holds the image token."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from .tiny_models import LLAMA3_REGEX, randomise, save_bpe_tokenizer

# image normalisation written to preprocessor_config.json: not the defaults, so a converter that
# ignores the file is caught
IMAGE_MEAN = [0.40, 0.45, 0.50]
IMAGE_STD = [0.25, 0.30, 0.35]


def bpe_tokenizer_with(d: Path, extra: list[str]) -> int:
    """The llama-3-style BPE tokenizer plus `extra` special tokens; returns the vocabulary size."""
    from transformers import PreTrainedTokenizerFast

    save_bpe_tokenizer(d, LLAMA3_REGEX, qwen=False, vocab_size=1000)
    tok = PreTrainedTokenizerFast.from_pretrained(str(d))
    tok.add_tokens(extra, special_tokens=True)
    tok.save_pretrained(str(d))
    return len(tok)


def llava_config(n_vocab: int, image_token: int, vision_type: str = "clip_vision_model",
                 image_size: int = 32, patch: int = 8):
    """CLIP towers keep the hidden states of the last layer but one without the class token
    (LLaVA-1.5); SigLIP towers have no class token and keep every position of the last layer."""
    import transformers as tf

    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=patch)
    clip = vision_type == "clip_vision_model"
    vc = tf.CLIPVisionConfig(**vision) if clip else tf.SiglipVisionConfig(**vision)
    tc = tf.LlamaConfig(vocab_size=n_vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        rms_norm_eps=1e-5, tie_word_embeddings=False)
    return tf.LlavaConfig(vision_config=vc, text_config=tc, image_token_index=image_token,
                          vision_feature_layer=-2 if clip else -1,
                          vision_feature_select_strategy="default" if clip else "full",
                          projector_hidden_act="gelu", image_seq_length=(image_size // patch) ** 2)


def build_llava(root: Path, name: str = "llava", vision_type: str = "clip_vision_model",
                tokenizer_from: Path | None = None) -> Path:
    """A 2-layer CLIP or SigLIP tower (32x32 images, 8x8 patches: 16 image tokens), a GELU MLP
    projector and a 2-layer llama with hidden 256 (rows of 256: every K-quant applies).
    tokenizer_from: copy that directory's tokenizer instead of training one."""
    import transformers as tf

    d = root / name
    d.mkdir()
    if tokenizer_from is None:
        bpe_tokenizer_with(d, ["<image>"])
    else:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_from / f, d / f)
    tok = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    n = max(t["id"] for t in tok["added_tokens"]) + 1
    image_token = next(t["id"] for t in tok["added_tokens"] if t["content"] == "<image>")
    cfg = llava_config(n, image_token, vision_type)
    cfg.text_config.bos_token_id = next(t["id"] for t in tok["added_tokens"] if t["content"] == "<|begin_of_text|>")
    cfg.text_config.eos_token_id = next(t["id"] for t in tok["added_tokens"] if t["content"] == "<|end_of_text|>")
    torch.manual_seed(0)
    model = tf.LlavaForConditionalGeneration(cfg)
    randomise(model, gemma=False)
    model.eval().save_pretrained(str(d))
    write_preprocessor(d, "CLIPImageProcessor" if vision_type == "clip_vision_model" else "SiglipImageProcessor", 32)
    return d


def write_preprocessor(d: Path, cls: str, size: int, image_seq_length: int | None = None) -> None:
    """preprocessor_config.json as transformers' image processor writes it (written directly: the
    processor classes need Pillow)."""
    cfg = {"image_processor_type": cls, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
           "do_normalize": True, "image_mean": IMAGE_MEAN, "image_std": IMAGE_STD, "resample": 3}
    if cls == "CLIPImageProcessor":
        cfg.update(size={"shortest_edge": size}, do_center_crop=True, crop_size={"height": size, "width": size})
    else:
        cfg.update(size={"height": size, "width": size})
    if image_seq_length is not None:
        cfg["image_seq_length"] = image_seq_length
    (d / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")


def sample_image(size: int, seed: int = 0) -> np.ndarray:
    """An RGB uint8 image with structure (gradients and a block), size x size."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    img = np.stack([x * 255 // max(size - 1, 1), y * 255 // max(size - 1, 1), (x + y) * 127 // max(size - 1, 1)], -1)
    img[size // 4: size // 2, size // 4: size // 2] = rng.integers(0, 256, 3)
    return img.astype(np.uint8)


def pixel_values(img: np.ndarray, mean=IMAGE_MEAN, std=IMAGE_STD) -> torch.Tensor:
    """What the image processor makes of an image already at the model's size: x/255, normalised."""
    x = torch.from_numpy(img.astype(np.float32) / 255.0).permute(2, 0, 1)
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return x.unsqueeze(0)


def build_gemma3_vlm(root: Path, name: str = "gemma3-vlm") -> Path:
    """Gemma3ForConditionalGeneration: a 2-layer SigLIP tower (32x32 images, 8x8 patches), Gemma-3's
    projector (2x2 average pool to 4 tokens, soft-embedding RMS norm, linear) and a 2-layer Gemma-3
    language model with hidden 256; a byte-level BPE tokenizer holding the image tokens."""
    import transformers as tf

    d = root / name
    d.mkdir()
    n = bpe_tokenizer_with(d, ["<start_of_image>", "<end_of_image>", "<image_soft_token>"])
    tok = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    vc = tf.SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               image_size=32, patch_size=8, vision_use_head=False)
    tc = tf.Gemma3TextConfig(vocab_size=n, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64,
                             max_position_embeddings=256, rms_norm_eps=1e-6, sliding_window=8,
                             layer_types=["sliding_attention", "full_attention"],
                             bos_token_id=ids["<|begin_of_text|>"], eos_token_id=ids["<|end_of_text|>"],
                             pad_token_id=ids["<|end_of_text|>"])
    cfg = tf.Gemma3Config(text_config=tc, vision_config=vc, mm_tokens_per_image=4,
                          boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
                          image_token_index=ids["<image_soft_token>"])
    torch.manual_seed(0)
    cfg._attn_implementation = "eager"
    model = tf.Gemma3ForConditionalGeneration(cfg)
    randomise(model, gemma=True)
    model.eval().save_pretrained(str(d))
    write_preprocessor(d, "Gemma3ImageProcessor", 32, image_seq_length=4)
    return d


def clip_cls_last_features(model, px: torch.Tensor) -> np.ndarray:
    """A CLIP LLaVA's image features from transformers' own modules, evaluated in the order the
    llama.cpp version quantkit runs uses (tools/mtmd/models/llava.cpp appends the class token
    after the patches, then keeps positions 1..n: llama.cpp issue 25814)."""
    vm = model.model.vision_tower
    vm = getattr(vm, "vision_model", vm)
    emb = vm.embeddings
    n_layer = model.config.vision_config.num_hidden_layers + 1 + model.config.vision_feature_layer
    with torch.no_grad():
        x = emb.patch_embedding(px).flatten(2).transpose(1, 2)
        seq = torch.cat([x, emb.class_embedding.view(1, 1, -1)], 1)
        seq = vm.pre_layrnorm(seq + emb.position_embedding.weight[: seq.shape[1]])
        for layer in vm.encoder.layers[:n_layer]:
            out = layer(seq, None)
            seq = out[0] if isinstance(out, tuple) else out
        return model.model.multi_modal_projector(seq[0, 1:]).numpy()
