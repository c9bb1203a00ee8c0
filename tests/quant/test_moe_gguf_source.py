"""GPTQ of a mixture of experts from a GGUF file: Qwen3-MoE and Mixtral converted by quantkit to
F32 GGUFs (the session's arch_f32 fixture), then GPTQ Q4_0 from the GGUF, write the same
tensors byte for byte as GPTQ Q4_0 from the Hugging Face directory on the same calibration
tokens, report the same per-expert token counts, and load and generate in llama.cpp."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.llama_logits import greedy_tokens
from quantkit import api
from quantkit.models.gguf import GGUFSource
from quantkit.quant.moe import summary_lines
from quantkit.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _calibration_text(data_dir: str, out: Path) -> str:
    """wikitext-2 valid with what transformers' and llama.cpp's tokenizers split differently
    removed: the literal '<unk>' (a special token to transformers, text to llama.cpp) and
    leading spaces (llama.cpp's SentencePiece prefix doubles them)."""
    text = (Path(data_dir) / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")[:20000]
    text = text.replace(" <unk>", "").replace(" @-@ ", "-")
    out.write_text("\n".join(line.strip() for line in text.splitlines() if line.strip()), encoding="utf-8")
    return str(out)


@pytest.mark.parametrize("kind", ["qwen3moe", "mixtral"])
def test_gptq_from_gguf_equals_gptq_from_hf_directory(arch_dirs, arch_f32, tmp_path, data_dir, kind, capsys):
    from transformers import AutoTokenizer
    from quantkit.quant.calib import calibration_ids
    from quantkit.quant.streaming import LlamaCppTokenizer
    d, f32 = arch_dirs(kind), arch_f32(kind)
    calib = _calibration_text(data_dir, tmp_path / "calib.txt")
    n, seqlen = 8, 64
    # the same calibration tensor on both sides (each source tokenizes with its own tokenizer)
    assert torch.equal(calibration_ids(AutoTokenizer.from_pretrained(str(d)), calib, n, seqlen),
                       calibration_ids(LlamaCppTokenizer(str(f32)), calib, n, seqlen))
    from_hf, from_gguf = tmp_path / "hf.gguf", tmp_path / "gguf.gguf"
    want = api.quantize(str(d), from_hf, format="gguf:q4_0", method="gptq", calib=calib, nsamples=n, seqlen=seqlen,
                        show_progress=False)
    capsys.readouterr()
    assert main(["quantize", str(f32), "--format", "gguf:q4_0", "--method", "gptq", "--calib", calib,
                 "--nsamples", str(n), "--seqlen", str(seqlen), "-o", str(from_gguf)]) == 0
    out = capsys.readouterr().out
    with GGUFSource(from_hf) as a, GGUFSource(from_gguf) as b:
        assert [(t.name, t.type, t.shape) for t in a.tensors()] == [(t.name, t.type, t.shape) for t in b.tensors()]
        assert b.tensor_info("blk.1.ffn_down_exps.weight").type == "q4_0"
        differ = [t.name for t in a.tensors() if not np.array_equal(np.asarray(a.raw(t.name)[0]),
                                                                     np.asarray(b.raw(t.name)[0]))]
        assert differ == []
    # per-expert token counts: the CLI's lines for the GGUF source are the HF source's report
    experts = want.report["experts"]
    assert list(experts) == ["model.layers.0", "model.layers.1"]
    assert all(sum(r["tokens"]) == n * seqlen * 2 for r in experts.values())        # top-2 of 4 experts
    got = [line for line in out.splitlines() if re.match(r"model\.layers\.\d+: 4 experts, tokens per expert", line)]
    assert got == summary_lines(experts), out
    assert len(greedy_tokens(from_gguf)) == 6
