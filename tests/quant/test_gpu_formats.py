"""GPU formats from a tiny random llama directory: compressed-tensors checkpoints load in
transformers (+ compressed-tensors, CPU) with logits equal to quantkit's own dequantized model;
GPTQ checkpoints match the layout AutoGPTQ writes, tensor by tensor and key by key.

transformers loads GPTQ checkpoints only through optimum + gptqmodel (neither installed), so the
GPTQ files are checked against the spec and decoded by an independent AutoGPTQ-style unpacker."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from quantkit import api
from quantkit.models.gpu_formats import GPUFormatConfig, dequantize_compressed, dequantize_gptq
from quantkit.quant.checkpoint import export_gpu_checkpoint
from quantkit.util.errors import QuantkitError
from helpers.intpack import autogptq_pack_rows
from helpers.tiny_models import tiny_model

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, data_dir):
    """A tiny structured llama saved as a Hugging Face directory, with a word-level tokenizer
    built from wikitext-2 valid (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    d = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama", structured=True)
    model.save_pretrained(d)
    with open(os.path.join(data_dir, "wikitext-2", "valid.txt"), encoding="utf-8") as f:
        words = f.read(200_000).split()
    vocab = {"<unk>": 0, "<s>": 1}
    for w in words:
        if len(vocab) >= 512:
            break
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>").save_pretrained(d)
    return str(d)


IDS = torch.randint(2, 512, (2, 20), generator=torch.Generator().manual_seed(7))


def _export(model_dir, out, **kw):
    fmt = kw.pop("format")
    return export_gpu_checkpoint(model_dir, str(out), GPUFormatConfig(fmt, **kw), nsamples=8, seqlen=32,
                                 keep_model=True, show_progress=False)


@pytest.mark.parametrize("method,bits,gs,sym,act", [("rtn", 4, 32, True, False), ("gptq", 4, 32, True, True),
                                                     ("gptq", 3, -1, True, False), ("rtn", 8, 64, True, False),
                                                     ("gptq", 4, 32, False, True), ("rtn", 3, -1, False, False)])
def test_compressed_tensors_loads_in_transformers(model_dir, tmp_path, method, bits, gs, sym, act):
    from transformers import AutoModelForCausalLM
    res = _export(model_dir, tmp_path / "ct", format="compressed-tensors", method=method, bits=bits,
                  group_size=gs, sym=sym, act_order=act)
    assert res.n_linear == 14
    qc = json.load(open(tmp_path / "ct" / "config.json"))["quantization_config"]
    from compressed_tensors import QuantizationConfig
    parsed = QuantizationConfig.model_validate(qc)           # compressed-tensors accepts the config
    w = parsed.config_groups["group_0"].weights
    assert (w.num_bits, w.symmetric, w.group_size if gs != -1 else -1) == (bits, sym, gs)
    assert qc["format"] == "pack-quantized" and qc["quant_method"] == "compressed-tensors"
    assert qc.get("dequantize", False) == (not sym)          # asymmetric: decompressed at load (ASYM_LOAD)

    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    ours = res.model
    with torch.no_grad():
        a = theirs(input_ids=IDS).logits
        b = ours(input_ids=IDS).logits
        ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()(input_ids=IDS).logits
    # equal up to float32 reassociation: 1e-5 of the logit scale
    assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max()), float((a - b).abs().max())
    assert float((b - ref).abs().max()) > 1e-3           # and it is quantized: not the float model
    # quantkit's own reader decodes the same weights, exactly
    t = load_file(tmp_path / "ct" / "model.safetensors") if (tmp_path / "ct" / "model.safetensors").exists() else None
    if t is None:
        t = {}
        for f in os.listdir(tmp_path / "ct"):
            if f.endswith(".safetensors"):
                t.update(load_file(tmp_path / "ct" / f))
    for i in range(2):
        for lin in LINEARS:
            p = f"model.layers.{i}.{lin}"
            assert torch.equal(dequantize_compressed(t, p, bits, gs), ours.get_submodule(p).weight)
            assert t[f"{p}.weight_packed"].dtype == torch.int32
            assert (f"{p}.weight_zero_point" in t) == (not sym)


@pytest.mark.parametrize("method,bits,gs,act", [("gptq", 4, 32, True), ("rtn", 3, 64, False), ("gptq", 6, -1, False)])
def test_asymmetric_compressed_tensors_are_their_compressors_tensors(model_dir, tmp_path, method, bits, gs, act):
    """Every tensor of an asymmetric linear is what compressed-tensors' own compressor (the one
    llm-compressor saves with) makes of the same weight, scale and zero point, and its
    decompressor gives the weight back exactly."""
    from compressed_tensors import QuantizationConfig
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    res = _export(model_dir, tmp_path / "ct", format="compressed-tensors", method=method, bits=bits,
                  group_size=gs, sym=False, act_order=act)
    qc = QuantizationConfig.model_validate(json.load(open(tmp_path / "ct" / "config.json"))["quantization_config"])
    scheme = qc.config_groups["group_0"]
    t = _all_tensors(tmp_path / "ct")
    for i in range(2):
        for lin in LINEARS:
            p = f"model.layers.{i}.{lin}"
            local = {k[len(p) + 1:]: v for k, v in t.items() if k.startswith(p + ".")}
            assert set(local) == {"weight_packed", "weight_scale", "weight_zero_point", "weight_shape"}
            w = res.model.get_submodule(p).weight
            out_f = w.shape[0]
            zp = local["weight_zero_point"]
            assert zp.dtype == torch.int32 and zp.shape == (-(-out_f * bits // 32), local["weight_scale"].shape[1])
            signed_zp = unpack_from_int32(zp, bits, (out_f, zp.shape[1]), packed_dim=0)    # z - 2**(bits-1)
            theirs = PackedQuantizationCompressor.compress(
                {"weight": w, "weight_scale": local["weight_scale"], "weight_zero_point": signed_zp}, scheme)
            assert set(theirs) == set(local)
            for k in local:
                assert torch.equal(theirs[k], local[k]), (p, k)
            assert torch.equal(PackedQuantizationCompressor.decompress(local, scheme)["weight"].float(), w)


def test_asymmetric_compressed_tensors_default_transformers_load_rejects_the_packed_zero_point(model_dir, tmp_path):
    """Why asymmetric files carry `dequantize`: without it transformers builds weight_zero_point
    unpacked and stops on the packed tensor compressed-tensors' compressor writes (the previous
    test: quantkit's tensors are that compressor's). When this stops raising, transformers
    loads such files by default and the key can go."""
    from transformers import AutoModelForCausalLM
    out = tmp_path / "ct"
    _export(model_dir, out, format="compressed-tensors", method="rtn", bits=4, group_size=32, sym=False)
    cfg = json.load(open(out / "config.json"))
    del cfg["quantization_config"]["dequantize"]
    json.dump(cfg, open(out / "config.json", "w"))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)


def _all_tensors(d):
    t = {}
    for f in os.listdir(d):
        if f.endswith(".safetensors"):
            t.update(load_file(os.path.join(d, f)))
    return t


def autogptq_dequant_4bit(qweight, qzeros, scales, g_idx):
    """AutoGPTQ's torch dequantization for 4 bits, v1 zeros (+1), written independently."""
    wf = torch.arange(0, 32, 4, dtype=torch.int32)
    zeros = torch.bitwise_right_shift(qzeros.unsqueeze(2), wf.view(1, 1, -1)) & 15
    zeros = (zeros + 1).reshape(qzeros.shape[0], -1)
    weight = torch.bitwise_right_shift(qweight.unsqueeze(1), wf.view(1, -1, 1)) & 15
    weight = weight.reshape(-1, qweight.shape[1])
    return (scales[g_idx.long()].float() * (weight - zeros[g_idx.long()]).float()).t()


@pytest.mark.parametrize("method,bits,gs,sym,act", [("gptq", 4, 32, True, True), ("rtn", 3, 64, False, False),
                                                     ("gptq", 2, -1, False, False)])
def test_gptq_checkpoint_layout(model_dir, tmp_path, method, bits, gs, sym, act):
    out = tmp_path / "gptq"
    res = _export(model_dir, out, format="gptq", method=method, bits=bits, group_size=gs, sym=sym, act_order=act)
    cfg = json.load(open(out / "config.json"))
    qc = cfg["quantization_config"]
    for k, v in {"bits": bits, "group_size": gs, "desc_act": act, "sym": sym, "quant_method": "gptq",
                 "checkpoint_format": "gptq", "static_groups": True}.items():
        assert qc[k] == v, k
    assert json.load(open(out / "quantize_config.json")) == qc
    assert cfg["torch_dtype"] == "float16"
    assert os.path.isfile(out / "tokenizer.json")
    t = _all_tensors(out)
    assert t["model.embed_tokens.weight"].dtype == torch.float16 and "lm_head.weight" in t
    ours = res.model
    for i in range(2):
        for lin in LINEARS:
            p = f"model.layers.{i}.{lin}"
            out_f, in_f = ours.get_submodule(p).weight.shape
            groups = 1 if gs == -1 else in_f // gs
            assert f"{p}.weight" not in t
            assert t[f"{p}.qweight"].shape == (in_f * bits // 32, out_f) and t[f"{p}.qweight"].dtype == torch.int32
            assert t[f"{p}.qzeros"].shape == (groups, out_f * bits // 32) and t[f"{p}.qzeros"].dtype == torch.int32
            assert t[f"{p}.scales"].shape == (groups, out_f) and t[f"{p}.scales"].dtype == torch.float16
            assert torch.equal(t[f"{p}.g_idx"], torch.arange(in_f, dtype=torch.int32) // (in_f if gs == -1 else gs))
            deq = dequantize_gptq(t, p, bits)
            assert torch.equal(deq, ours.get_submodule(p).weight)
            # qweight bit for bit as AutoGPTQ's pack loop lays out the same codes
            q = torch.round(deq.t() / t[f"{p}.scales"].float()[t[f"{p}.g_idx"].long()]).to(torch.int64)
            from quantkit.codecs.intpack import unpack_int32
            z = unpack_int32(t[f"{p}.qzeros"], bits, out_f, dim=1) + 1
            codes = (q + z[t[f"{p}.g_idx"].long()]).numpy()
            assert np.array_equal(autogptq_pack_rows(codes, bits), t[f"{p}.qweight"].numpy())
            if bits == 4:
                assert torch.equal(autogptq_dequant_4bit(t[f"{p}.qweight"], t[f"{p}.qzeros"], t[f"{p}.scales"],
                                                         t[f"{p}.g_idx"]), deq)
            if sym:      # zero 2**(bits-1), stored minus one: 0x77777777 for 4 bits
                assert (unpack_int32(t[f"{p}.qzeros"], bits, out_f, dim=1) == 2 ** (bits - 1) - 1).all()


def test_format_rejects_unsupported_bits(model_dir, tmp_path):
    with pytest.raises(QuantkitError, match="gptq does not support 5-bit"):
        GPUFormatConfig("gptq", bits=5)
    with pytest.raises(QuantkitError, match="group size 100"):
        GPUFormatConfig("compressed-tensors", group_size=100)
    with pytest.raises(QuantkitError, match="calibration text too short"):
        export_gpu_checkpoint(model_dir, str(tmp_path / "x"), GPUFormatConfig("gptq", group_size=32), nsamples=100_000,
                              seqlen=512, show_progress=False)
    assert not os.path.exists(tmp_path / "x") and os.listdir(tmp_path) == []


def test_cli_module(model_dir, tmp_path, capsys):
    """quantize_gptq.register_args + run, on a parser shaped like the lead's `quantize`."""
    import argparse
    from quantkit.commands import quantize_gptq
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--format", default="gguf:q4_0")
    p.add_argument("--method", default="rtn", choices=["rtn", "gptq", "dynamic-int8"])
    quantize_gptq.register_args(p)
    out = tmp_path / "cli-out"
    args = p.parse_args([model_dir, "-o", str(out), "--format", "compressed-tensors", "--method", "gptq",
                         "--bits", "3", "--group-size", "32", "--asym", "--act-order", "--nsamples", "4",
                         "--seqlen", "16"])
    assert quantize_gptq.run(args) == 0
    assert "14 linear layers gptq 3-bit g32 asym act-order" in capsys.readouterr().out
    w = json.load(open(out / "config.json"))["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["group_size"], w["symmetric"], w["actorder"]) == (3, 32, False, "weight")
    with pytest.raises(QuantkitError, match="not available"):
        quantize_gptq.run(p.parse_args([model_dir, "-o", str(tmp_path / "g.gguf"), "--method", "rtn"]))
    with pytest.raises(SystemExit):
        p.parse_args([model_dir, "-o", "x", "--bits", "7"])


def test_write_safetensors_reads_back_in_safetensors(tmp_path):
    """quantkit's streaming shard writer: every dtype the checkpoints hold, empty tensors and the
    metadata read back identically through the safetensors package."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from quantkit.models.gpu_formats import write_safetensors
    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(3, 5, generator=g), "packed": torch.randint(-2**31, 2**31 - 1, (7, 2), dtype=torch.int32),
               "scale": torch.randn(4, 4, generator=g).bfloat16(), "half": torch.randn(9, generator=g).half(),
               "shape": torch.tensor([5, 3]), "empty": torch.zeros(0, 3), "codes": torch.randint(0, 255, (5,), dtype=torch.uint8)}
    path = str(tmp_path / "x.safetensors")
    write_safetensors(path, tensors, {"format": "pt"})
    back = load_file(path)
    assert back.keys() == tensors.keys()
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_streamed_export_equals_the_in_memory_one(model_dir, tmp_path):
    """Streaming (blocks one at a time; embeddings and head read a chunk of rows at a time, the
    calibration captured through an embedding of only the rows it uses, the ids renumbered) writes
    the very bytes of the export that holds the whole model."""
    outs = {}
    for keep in (True, False):
        outs[keep] = tmp_path / f"keep-{keep}"
        export_gpu_checkpoint(model_dir, str(outs[keep]), GPUFormatConfig("compressed-tensors", bits=4, group_size=32,
                                                                          act_order=True),
                              nsamples=8, seqlen=32, keep_model=keep, show_progress=False)
    def tensors(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    a, b = tensors(outs[True]), tensors(outs[False])
    assert a.keys() == b.keys() and "lm_head.weight" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_compact_embeddings_gathers_across_chunks(model_dir, monkeypatch):
    """Rows gathered from several chunks, renumbered ids: the embedding's output is unchanged."""
    from quantkit.models.hf import HFSource
    from quantkit.quant import streaming
    monkeypatch.setattr(streaming, "EMBED_CHUNK_ROWS", 100)
    src = HFSource(model_dir, tokenizer=False)
    try:
        model, _, arch, _ = streaming.streaming_model(src, model_dir, lazy_embeddings=True)
        full = src.load_hf("model.embed_tokens.weight")
        ids = torch.tensor([[1, 511, 99, 100, 1], [250, 0, 511, 101, 7]])
        new = streaming.compact_embeddings(model, streaming.row_reader(src, arch), ids)
    finally:
        src.close()
    emb = model.get_input_embeddings()
    assert emb.weight.shape == (8, full.shape[1])              # 8 distinct ids
    assert torch.equal(emb(new), full[ids])


def test_write_safetensors_row_chunks(tmp_path):
    """A RowChunks entry is written chunk by chunk, converted to its dtype, with the bytes of the
    whole tensor; a chunk holding NaN stops the write with the tensor's name."""
    from quantkit.models.gpu_formats import RowChunks, write_safetensors
    w = torch.randn(10, 3, generator=torch.Generator().manual_seed(1))
    path = str(tmp_path / "r.safetensors")
    write_safetensors(path, {"a": torch.ones(2), "w": RowChunks("w", (10, 3), torch.bfloat16, lambda r0, r1: w[r0:r1], chunk=4)})
    back = load_file(path)
    assert torch.equal(back["w"], w.bfloat16()) and torch.equal(back["a"], torch.ones(2))
    bad = w.clone()
    bad[9, 0] = float("nan")
    with pytest.raises(QuantkitError, match="tensor w has 1 NaN/Inf values"):
        write_safetensors(path, {"w": RowChunks("w", (10, 3), torch.float32, lambda r0, r1: bad[r0:r1], chunk=4)})


@pytest.mark.parametrize("reserve", [1 << 20, 64])
def test_checkpoint_writer_streams_shards(tmp_path, monkeypatch, reserve):
    """Tensors go to disk as they are added (the header last, in reserved space, or moved to the
    front when it outgrows that space); shards roll over at SHARD_BYTES; the safetensors package
    reads every shard back, with the index naming each tensor's shard."""
    from safetensors import safe_open

    from quantkit.models import gpu_formats as gf
    monkeypatch.setattr(gf, "HEADER_RESERVE", reserve)
    monkeypatch.setattr(gf, "SHARD_BYTES", 1000)
    g = torch.Generator().manual_seed(2)
    w = gf.CheckpointWriter(str(tmp_path), GPUFormatConfig("compressed-tensors"), {"model_type": "llama"}, torch.float32)
    ref = {}
    for i in range(5):
        t = torch.randn(10, 12, generator=g)               # 480 bytes: a new shard every 3 tensors
        w.add(f"t{i}", t)
        ref[f"t{i}"] = t
    emb = torch.randn(7, 4, generator=g)
    w.add_rows("emb", (7, 4), lambda r0, r1: emb[r0:r1])
    ref["emb"] = emb
    w.finish()
    back = {}
    for f in sorted(tmp_path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            assert h.metadata() == {"format": "pt"}
        back.update(load_file(str(f)))
    assert back.keys() == ref.keys()
    for k in ref:
        assert torch.equal(back[k], ref[k]), k
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(ref) and len(set(index["weight_map"].values())) == 2
    with pytest.raises(ValueError, match="written twice"):
        w.add("t0", torch.zeros(1))


def test_gguf_tokenizer_files_named_class_equal_autotokenizers(bundled_gguf, tmp_path):
    """The bundled Gemma GGUF's tokenizer files, with the tokenizer class named from the file's
    architecture (fast: no config is built from the whole file), are byte for byte the files
    transformers' own AutoTokenizer path writes, and they load back and add Gemma's <bos>."""
    from transformers import AutoTokenizer

    from quantkit.models.gguf import GGUFSource
    from quantkit.quant.checkpoint import gguf_tokenizer_files
    src = GGUFSource(bundled_gguf)
    arch = src.metadata["general.architecture"].value
    src.close()
    assert arch == "gemma3"
    fast, slow = tmp_path / "fast", tmp_path / "slow"
    assert gguf_tokenizer_files(bundled_gguf, str(fast), arch)
    assert gguf_tokenizer_files(bundled_gguf, str(slow))
    names = sorted(os.listdir(fast))
    assert names == sorted(os.listdir(slow)) and "tokenizer.json" in names
    for n in names:
        assert (fast / n).read_bytes() == (slow / n).read_bytes(), n
    text = "The tokenizer's   spaces, 数字 123 and émigrés."
    ids = AutoTokenizer.from_pretrained(fast)(text)["input_ids"]
    assert len(ids) > 10 and ids[0] == 2                            # <bos>, then the text


def _cli(args):
    """`quantkit ARGS` in a child process: (exit code, stderr)."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", f"import sys; from quantkit.cli import main; sys.exit(main({args!r}))"],
                       capture_output=True, text=True, timeout=300)
    return r.returncode, r.stderr


def _one_line(err: str) -> str:
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "it/s]" not in ln
             and "s/it]" not in ln and "block" not in ln.split(":")[0]]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_gpu_cli_bad_inputs_end_in_one_line(model_dir, tmp_path):
    """Bad inputs of `quantize --format gptq|compressed-tensors`: one line, exit 2, nothing left."""
    import shutil
    from safetensors.torch import save_file
    before = sorted(os.listdir(model_dir))
    # -o naming the source model's own folder: refused before any work, the folder untouched
    code, err = _cli(["quantize", str(model_dir), "--format", "gptq", "-o", str(model_dir)])
    assert code == 2 and "-o is the input" in _one_line(err) and str(model_dir) in err
    assert sorted(os.listdir(model_dir)) == before
    work = tmp_path / "work"
    work.mkdir()
    short = work / "short.txt"
    short.write_text("the cat sat on the mat\n", encoding="utf-8")
    code, err = _cli(["quantize", str(model_dir), "--format", "compressed-tensors", "--method", "gptq",
                      "--calib", str(short), "--nsamples", "8", "--seqlen", "64", "--group-size", "32",
                      "-o", str(work / "a")])
    line = _one_line(err)
    # 8 x 64 text tokens: this tokenizer defines <s> but never puts it before a text (no BOS slot)
    assert code == 2 and "calibration text too short: it has 6 tokens" in line and "need 512" in line, line
    # a group size that does not divide the input features (64): named, with the layer
    code, err = _cli(["quantize", str(model_dir), "--format", "compressed-tensors", "--group-size", "1024",
                      "-o", str(work / "b")])
    line = _one_line(err)
    assert code == 2 and "group size 1024 does not divide the 64 input features of model.layers.0." in line, line
    assert str(model_dir) in line
    # NaN in a decoder weight: the tensor is named
    bad = tmp_path / "nan-model"
    shutil.copytree(model_dir, bad)
    t = load_file(bad / "model.safetensors")
    t["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(t, bad / "model.safetensors", metadata={"format": "pt"})
    for method in ("rtn", "gptq"):
        code, err = _cli(["quantize", str(bad), "--format", "gptq", "--method", method, "--nsamples", "4",
                          "--seqlen", "16", "--group-size", "32", "-o", str(work / f"c-{method}")])
        line = _one_line(err)
        assert code == 2 and "model.layers.1.mlp.down_proj.weight" in line and "NaN" in line, line
    assert sorted(os.listdir(work)) == ["short.txt"]
    assert not any("partial" in f for f in os.listdir(tmp_path))


def test_gpu_cli_interrupt_leaves_nothing(model_dir, tmp_path):
    """Ctrl-C while a GPU checkpoint is being calibrated and written: exit 130, one line, no
    partial directory."""
    from helpers.cli import interrupt_mid_run
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    interrupt_mid_run(["quantize", str(model_dir), "--format", "compressed-tensors", "--method", "gptq",
                       "--nsamples", "256", "--seqlen", "256", "-o", str(out_dir / "ckpt")], out_dir, settle=0.5)


def test_gpu_checkpoint_records_its_settings(model_dir, tmp_path):
    """quantize_config.json records the GPTQ run as it was made: true_sequential off when asked,
    the marker that lets a later run replace the directory, and a rerun replacing its output."""
    from quantkit.util.atomic import MARKER
    out = tmp_path / "g"
    weights = {}
    for ts in (False, True):
        api.quantize_gpu(model_dir, out, format="gptq", method="gptq", group_size=32, nsamples=4, seqlen=16,
                         true_sequential=ts, show_progress=False)
        qc = json.load(open(out / "quantize_config.json"))
        assert qc["true_sequential"] is ts and qc["damp_percent"] == 0.01
        assert "damp_raised" not in qc["meta"]
        assert os.path.isfile(out / MARKER)
        weights[ts] = _all_tensors(out)
    # the option is applied, not only recorded: the first stage (q/k/v, on the block's float
    # inputs either way) is the same in block 0, the later stages saw different inputs
    p = "model.layers.0.self_attn"
    assert torch.equal(weights[False][f"{p}.q_proj.qweight"], weights[True][f"{p}.q_proj.qweight"])
    assert not torch.equal(weights[False][f"{p}.o_proj.qweight"], weights[True][f"{p}.o_proj.qweight"])
    api.quantize_gpu(model_dir, out, format="gptq", method="rtn", group_size=32, show_progress=False)
    assert json.load(open(out / "quantize_config.json"))["true_sequential"] is False   # RTN: no calibration


def test_api_quantize_writes_gpu_formats_as_the_cli_does(model_dir, tmp_path):
    """api.quantize mirrors `quantkit quantize`: a GPU format goes to the same writer as
    api.quantize_gpu, file for file; the GGUF-only keywords are refused in one line."""
    a, b = tmp_path / "a", tmp_path / "b"
    res = api.quantize(model_dir, a, format="gptq:w4g32+rtn", show_progress=False)
    api.quantize_gpu(model_dir, b, format="gptq:w4g32+rtn", show_progress=False)
    assert res.n_linear == 14 and os.path.isfile(a / "quantize_config.json")
    ta, tb = _all_tensors(a), _all_tensors(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    with pytest.raises(QuantkitError, match="pure, imatrix apply to GGUF files"):
        api.quantize(model_dir, tmp_path / "c", format="compressed-tensors:w4g32", pure=True, imatrix="x.dat")
    assert not os.path.exists(tmp_path / "c")
