"""quantkit explain: the six names from the issue, field by field, and the CLI."""

from __future__ import annotations

import json

import pytest

import quantkit.cli as cli
from quantkit.plan.names import explain

LLAMA2_7B = 6_738_415_616      # transformers' parameter count for Llama-2-7b-hf
LLAMA2_13B = 13_015_864_320


def test_llama2_13b_chat_gptq():
    i = explain("Llama-2-13B-chat-GPTQ")
    assert (i.method, i.bits, i.group_size, i.act_order) == ("gptq", 4, 128, False)
    assert {"bits", "group_size"} <= set(i.assumed)           # not in the name: TheBloke's main branch
    assert i.base_model == "llama-2-13b" and i.params == LLAMA2_13B and i.chat
    assert "safetensors" in i.file_format and "GPU" in i.runtime
    # GPTQ 4-bit g128: per block linear [o, i] o*i/2 + (i/128)*o*(0.5 + 2) + 4i bytes; embeddings,
    # head and norms in fp16 as in the HF checkpoint (40 layers, hidden 5120, ffn 13824, vocab 32000)
    h, f, L, V = 5120, 13824, 40, 32000
    mats = [(h, h)] * 4 + [(f, h)] * 2 + [(h, f)]
    per_layer = sum(o * n // 2 + (n // 128) * o * 5 // 2 + 4 * n for o, n in mats)
    expected = L * per_layer + 2 * 2 * V * h + 2 * (2 * L + 1) * h
    assert i.est_file_bytes == expected
    assert i.est_memory_bytes > i.est_file_bytes


def test_pygmalion_13b_4bit_128g():
    i = explain("pygmalion-13b-4bit-128g")
    assert (i.method, i.bits, i.group_size) == ("gptq", 4, 128)
    assert "method" in i.assumed                               # GPTQ-for-LLaMa naming, no method word
    assert i.params == 13_000_000_000 and i.params_from == "name"
    # 4 bits + (16-bit scale + 4-bit zero) per 128 weights
    assert i.est_file_bytes == int(13e9 * (4 + 20 / 128) / 8)


def test_chinese_llama2_7b_ggml_q4():
    i = explain("Chinese-Llama-2-7b-ggml-q4")
    assert i.method == "ggml" and i.qtype == "q4_0" and "qtype" in i.assumed
    assert i.bits == 4.5                                       # 18 bytes per 32 weights
    assert "GGML" in i.file_format and "CPU" in i.runtime and "GGUF" in i.runtime
    assert i.base_model == "llama-2-7b" and any("vocabular" in n for n in i.notes)


def test_llama2_13b_chat_gguf():
    i = explain("Llama-2-13B-chat-GGUF")
    assert i.method == "gguf" and i.qtype is None and i.bits is None
    assert "GGUF" in i.file_format and "llama.cpp" in i.runtime
    # TheBloke/Llama-2-13B-chat-GGUF lists Q4_K_M at 7.87 GB and Q8_0 at 13.83 GB; the files add
    # about 0.75 MB of header (tokenizer) to the tensor bytes
    assert i.sizes["q4_k_m"] == pytest.approx(7.87e9, rel=0.001)
    assert i.sizes["q8_0"] == pytest.approx(13.83e9, rel=0.001)
    # q8_0 exactly: every 2D tensor 34 bytes per 32 weights, 81 norm vectors of 5120 in f32
    n_2d = LLAMA2_13B - 81 * 5120
    assert i.sizes["q8_0"] == n_2d // 32 * 34 + 81 * 5120 * 4


def test_chatglm2_6b_int4():
    i = explain("chatglm2-6b-int4")
    assert (i.method, i.bits, i.group_size) == ("int4", 4, -1)
    assert i.base_model == "chatglm2-6b"
    # 28 layers: fused qkv 4608x4096 (+bias), dense 4096x4096, h->4h 27392x4096, 4h->h 4096x13696
    mats = [(4608, 4096), (4096, 4096), (27392, 4096), (4096, 13696)]
    lin = 28 * sum(o * n // 2 + 2 * o for o, n in mats)
    rest = 2 * (2 * 65024 * 4096 + 28 * (2 * 4096 + 4608) + 4096)   # embeddings, head, norms, qkv bias: fp16
    assert i.est_file_bytes == lin + rest


def test_llama2_7b_fp16():
    i = explain("Llama-2-7B-fp16")
    assert (i.method, i.bits) == ("none", 16)
    assert i.base_model == "llama-2-7b"
    assert i.est_file_bytes == 2 * LLAMA2_7B


@pytest.mark.parametrize("name,method,bits,group", [
    ("Mistral-7B-Instruct-v0.2-AWQ", "awq", 4, 128),
    ("llama-2-7b.Q4_K_M.gguf", "gguf", 4.5, None),
    ("TheBloke/Llama-2-7B-GPTQ-4bit-32g-actorder", "gptq", 4, 32),
])
def test_more_tags(name, method, bits, group):
    i = explain(name)
    assert (i.method, i.bits, i.group_size) == (method, bits, group)


def test_cli_explain_json_and_errors(capsys, monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", ["plan", "explain"])
    assert cli.main(["explain", "pygmalion-13b-4bit-128g", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["group_size"] == 128 and d["method"] == "gptq"
    assert cli.main(["explain", "Llama-2-13B-chat-GPTQ"]) == 0
    out = capsys.readouterr().out
    assert "4 (assumed)" in out and "128 (assumed)" in out
    assert cli.main(["explain", "  "]) == 2
    err = capsys.readouterr().err
    assert "empty model name" in err and err.count("\n") == 1


def test_iq_types_sizes_from_the_block_table():
    from quantkit.plan import formats
    from quantkit.plan.model import from_name
    # gguf GGML_QUANT_SIZES: IQ4_XS 136 bytes / 256 weights, IQ4_NL 18 / 32, IQ3_XXS 98 / 256, IQ2_XXS 66 / 256
    m = from_name("llama-2-7b")
    ts = {t.name: t for t in formats.tensor_bytes(m, "iq4_xs")}
    assert ts["blk.0.attn_q.weight"].nbytes == 4096 * 4096 // 256 * 136
    assert ts["blk.0.ffn_down.weight"].nbytes == 4096 * 11008 // 256 * 136   # 11008 = 43 x 256
    assert ts["output.weight"].nbytes == 32000 * 4096 // 256 * 210         # head in Q6_K
    assert ts["token_embd.weight"].type == "iq4_xs"
    ts = {t.name: t for t in formats.tensor_bytes(m, "iq2_xxs")}
    assert ts["blk.0.attn_k.weight"].nbytes == 4096 * 4096 // 256 * 66
    assert ts["output.weight"].type == "q5_k"
    # rows that are not a multiple of 256 fall back to IQ4_NL (Gemma-3-270M: hidden 640)
    g = {t.name: t for t in formats.tensor_bytes(from_name("gemma-3-270m"), "iq3_xxs")}
    assert g["blk.0.attn_q.weight"].type == "iq4_nl"
    assert g["blk.0.attn_q.weight"].nbytes == 1024 * 640 // 32 * 18


def test_explain_iq_name_has_size_and_says_how_it_is_sized():
    i = explain("Llama-2-13B-chat-IQ3_XXS.gguf")
    assert i.qtype == "iq3_xxs" and i.bits == 3.0625
    assert i.est_file_bytes and 4.5e9 < i.est_file_bytes < 5.5e9     # ~3.1 bits x 13 B
    assert any("llama-quantize --imatrix" in n for n in i.notes)
