"""all-MiniLM-L6-v2 as an Encoder: encode, dynamic int8 fidelity, save/load, CLI, bad input."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import torch

from quantkit.api import load_encoder, quantize_dynamic
from quantkit.eval.metrics import recall_at_k
from quantkit.models.encoder import check_encoder_dir, dir_size, load_encoder as load_fp32_only
from quantkit.util.errors import QuantkitError

from helpers.encoders import minilm, save_tiny_bert

pytestmark = pytest.mark.usefixtures("one_thread")
from quantkit.util.data import DATA_DIR

DATA = Path(DATA_DIR)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def wikitext_sentences(n: int, split: str = "test") -> list[str]:
    out = []
    with open(DATA / "wikitext-2" / f"{split}.txt", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if len(line.split()) >= 8 and not line.startswith("="):
                out.append(" ".join(line.split()[:40]))
            if len(out) == n:
                break
    return out


@pytest.fixture(scope="module")
def fp32():
    return minilm()          # one load per session, shared with test_distill


@pytest.fixture(scope="module")
def sentences():
    return wikitext_sentences(48)


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "minilm-int8"
    summary = quantize_dynamic(None, out, quantize_embeddings=True)
    return out, summary


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random 2-layer, 32-wide BERT with MiniLM's tokenizer: fast CLI and error-path tests."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny") / "tiny-bert")


def test_encode_api(fp32):
    e = fp32.encode(["a cat sat on the mat", "a cat sat on the mat", "stock markets fell sharply"])
    assert e.shape == (3, 384) and e.dtype == torch.float32
    assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    assert (e[0] @ e[1]).item() > 0.9999
    assert (e[0] @ e[2]).item() < 0.5
    assert fp32.encode([]).shape == (0, 384)


def test_int8_fidelity_size_reload(fp32, sentences, int8_dir):
    out, summary = int8_dir
    assert summary["linear"] == 36 and summary["embedding"] == 3
    # linear weights 4x smaller (int8 + one fp32 scale per output channel), file < 30% of fp32
    assert summary["linear_bytes_before"] / summary["linear_bytes_after"] > 3.9
    assert dir_size(out) < 0.3 * dir_size(fp32.source_dir)
    q = load_encoder(out)
    assert q.meta.quantization["method"] == "dynamic-int8"
    assert q.meta.quantization["quantize_embeddings"] is True
    ref, got = fp32.encode(sentences), q.encode(sentences)
    cos = (ref * got).sum(1)
    assert cos.mean() >= 0.99 and cos.min() >= 0.97, (cos.mean(), cos.min())
    assert recall_at_k(ref, got, 10) >= 0.85
    # a second load gives the same vectors; batch size does not change them much
    assert torch.equal(load_encoder(out).encode(sentences[:8]), q.encode(sentences[:8]))
    assert ((q.encode(sentences[:8], batch_size=1) * got[:8]).sum(1)).min() > 0.99
    # no pickle anywhere in the output
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))


def test_cli_run(tmp_path, capsys, tiny_dir):
    from quantkit.commands.quantize_dynamic import run

    out = tmp_path / "cli-int8"
    rc = run(argparse.Namespace(model=str(tiny_dir), output=str(out), quantize_embeddings=False))
    assert rc == 0 and (out / "model.safetensors").exists()
    assert "12 linear" in capsys.readouterr().out
    assert load_encoder(out).encode(["hello world"]).shape == (1, 32)
    with pytest.raises(QuantkitError, match="already quantized"):
        run(argparse.Namespace(model=str(out), output=str(tmp_path / "again"), quantize_embeddings=False))


def test_int8_needs_quant_aware_loader(int8_dir):
    with pytest.raises(QuantkitError, match="quantized"):
        load_fp32_only(int8_dir[0])


def test_not_an_encoder(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(QuantkitError, match="not an encoder"):
        quantize_dynamic(str(gguf), tmp_path / "o")
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(QuantkitError, match="model_type 'llama'"):
        quantize_dynamic(str(llama), tmp_path / "o")
    with pytest.raises(QuantkitError, match="no such model"):
        quantize_dynamic(str(tmp_path / "missing"), tmp_path / "o")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(QuantkitError, match="no config.json"):
        check_encoder_dir(str(empty))
    assert not (tmp_path / "o").exists()
