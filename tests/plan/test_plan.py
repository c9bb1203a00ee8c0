"""quantkit plan: hardware table, configs, weight bytes, KV cache, speed, training, CLI errors.

Expected values are derived by hand (comments show the arithmetic) or are published figures
(parameter counts printed by transformers / PEFT, vendor bandwidths), never outputs of the
code under test.
"""

from __future__ import annotations

import json
import os
import struct

import pytest

import quantkit.cli as cli
from quantkit.plan import formats, hardware, memory, speed
from quantkit.plan.model import ModelShape, Tensor, from_name, load
from quantkit.plan.planner import PlanOptions, plan
from quantkit.util.errors import QuantkitError

GIB = 1 << 30


def run_cli(argv, capsys, monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", ["plan", "explain"])   # other commands may not exist yet
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


# ---------------------------------------------------------------- hardware table

def test_every_hardware_row_has_a_source_and_sane_numbers():
    rows = hardware.rows()
    assert len(rows) >= 50
    for name, r in rows.items():
        assert r["source"].strip(), name
        assert r["bandwidth_gbs"] > 0, name


def test_issue_devices_are_present():
    names = set(hardware.devices())
    for n in ["rtx-3050", "rtx-3060", "rtx-3080", "rtx-3090", "rtx-4060", "rtx-4090", "gtx-1660", "rx-5700-xt",
              "rx-6900-xt", "rtx-a2000", "rtx-a4500", "rtx-a5000", "rtx-a6000", "t4", "v100", "p40", "a100-40gb",
              "a100-80gb", "a40", "l4", "h100", "h200", "apple-m1", "apple-m2-max", "apple-m3-pro", "apple-m4-max",
              "ddr4-2666-2ch", "ddr5-5600-2ch"]:
        assert n in names, n


def test_cpu_bandwidth_is_transfers_times_8_bytes_times_channels():
    for name, r in hardware.rows().items():
        if r["kind"] == "cpu":
            assert r["bandwidth_gbs"] == pytest.approx(r["mts"] * 8 * r["channels"] / 1000, abs=0.01), name


def test_device_lookup_multi_and_suggestions():
    d = hardware.device("2x RTX 3090")
    assert d.count == 2 and d.total_memory == 48 * GIB and d.bandwidth == 936e9
    assert hardware.device("NVIDIA GeForce RTX 4090").name == "rtx-4090"
    with pytest.raises(QuantkitError, match="rtx-3060"):
        hardware.device("rtx3060")
    with pytest.raises(QuantkitError, match="between 1 and 64"):
        hardware.device("0x rtx-3090")


# ---------------------------------------------------------------- configs

# parameter counts as transformers reports them (model.num_parameters()) for the HF checkpoints
PUBLISHED_PARAMS = {
    "llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320, "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248, "llama-3-70b": 70_553_706_496, "mistral-7b": 7_241_732_096,
    "mixtral-8x7b": 46_702_792_704, "qwen2.5-0.5b": 494_032_768, "qwen2.5-7b": 7_615_616_512,
    "phi-2": 2_779_683_840, "gemma-2-2b": 2_614_341_888, "gemma-3-270m": 268_098_176,
    "llama-3.2-1b": 1_235_814_400,
}


@pytest.mark.parametrize("name,n", sorted(PUBLISHED_PARAMS.items()))
def test_config_parameter_counts_match_published(name, n):
    assert from_name(name).n_params == n


def test_builtin_table_covers_the_issue_families():
    for n in ["llama-7b", "llama-65b", "llama-2-70b", "llama-3-8b", "qwen2.5-72b", "gemma-2-9b", "gemma-3-27b",
              "phi-2", "chatglm2-6b", "mixtral-8x7b"]:
        assert from_name(n).n_layer > 0


# ---------------------------------------------------------------- weight bytes

def test_q4_k_m_from_config_matches_the_bundled_file_tensor_by_tensor(bundled_gguf):
    """The Gemma-3-270M config (models.yaml) quantized on paper to Q4_K_M gives the types and
    bytes the real file holds: llama.cpp's mix and fallbacks (640 is not a multiple of 256)."""
    f = load(bundled_gguf)
    assert f.stored_format == "q4_k_m"
    planned = {t.name: t for t in formats.tensor_bytes(from_name("gemma-3-270m"), "q4_k_m")}
    assert set(planned) == {t.name for t in f.tensors}
    for t in f.tensors:
        assert (planned[t.name].type, planned[t.name].nbytes) == (t.type, t.nbytes), t.name
    # the file is the header, the tensors and alignment padding (32 bytes) only
    size = os.path.getsize(bundled_gguf)
    from quantkit.models.gguf_file import GGUFFile
    g = GGUFFile(bundled_gguf)
    data_offset = min(t.offset for t in g.tensors)
    g.close()
    assert 0 <= size - data_offset - f.stored_bytes < 32 * len(f.tensors)


def test_gptq_int8_nf4_bytes_by_hand():
    m = ModelShape("t", "llama", 1, 4096, 32, 32, 128, 11008, 32000, 4096, True)
    w = [Tensor("blk.0.attn_q.weight", (4096, 4096), "f16", 4096 * 4096 * 2)]
    # 4-bit, group 128: qweight 4096*4096/2 + qzeros 32 groups*4096/2 + scales 32*4096*2 + g_idx 4096*4
    assert formats.total(formats.tensor_bytes(m, "gptq-4bit-128g", w)) == 8_388_608 + 65_536 + 262_144 + 16_384
    # no groups (-1): one group per row
    assert formats.total(formats.tensor_bytes(m, "gptq-4bit-noneg", w)) == \
        8_388_608 + 2_048 + 8_192 + 16_384
    # AWQ: no g_idx
    assert formats.total(formats.tensor_bytes(m, "awq-4bit-128g", w)) == 8_388_608 + 65_536 + 262_144
    # LLM.int8: int8 weight + fp32 scale per row
    assert formats.total(formats.tensor_bytes(m, "int8", w)) == 4096 * 4096 + 4096 * 4
    # NF4 + double quant: 4 + 8/64 + 32/(64*256) = 4.127 bits per weight (QLoRA sec. 3)
    bpw = formats.total(formats.tensor_bytes(m, "nf4", w)) * 8 / (4096 * 4096)
    assert bpw == pytest.approx(4.127, abs=0.001)
    bpw = formats.total(formats.tensor_bytes(m, "nf4-nodq", w)) * 8 / (4096 * 4096)
    assert bpw == pytest.approx(4.5, abs=0.001)


def test_dense_formats_are_two_bytes_per_parameter():
    m = from_name("llama-2-7b")
    assert formats.total(formats.tensor_bytes(m, "fp16")) == 2 * 6_738_415_616


def test_unknown_format_is_a_clear_error():
    with pytest.raises(QuantkitError, match="unknown format"):
        formats.parse_format("q9_9")


# ---------------------------------------------------------------- KV cache

def test_kv_cache_llama2_7b_and_llama3_8b():
    # 32 layers x 4096 tokens x (K+V) x 4096 x 2 bytes = 2 GiB; GQA with 8 KV heads x 128 = 1024
    assert memory.kv_cache(from_name("llama-2-7b"), 4096).total == 2 * GIB
    assert memory.kv_cache(from_name("llama-3-8b"), 8192).total == 32 * 8192 * 2 * 1024 * 2 == GIB
    assert memory.kv_cache(from_name("llama-3-8b"), 8192, batch=4).total == 4 * GIB


def test_kv_cache_gemma3_sliding_window_llama_cpp():
    m = from_name("gemma-3-270m")
    row = 2 * 1 * 256 * 2            # K + V, 1 KV head x 256, f16
    kv = memory.kv_cache(m, 32768)
    # 3 global layers hold 32768 cells; 15 sliding layers PAD(min(32768, 512 + 512), 256) = 1024
    assert (kv.n_full_layers, kv.n_swa_layers) == (3, 15)
    assert kv.total == 3 * 32768 * row + 15 * 1024 * row == 116_391_936
    assert memory.kv_cache(m, 32768, swa_full=True).total == 18 * 32768 * row
    assert memory.kv_cache(m, 512).total == 18 * 512 * row
    # torch: sliding layers keep the window itself
    assert memory.kv_cache(m, 4096, runtime="torch").total == 3 * 4096 * row + 15 * 512 * row


def test_quantized_kv_block_overhead():
    m = from_name("gemma-3-270m")
    # q8_0: 256 values = 8 blocks x 34 bytes; q4_0: 8 blocks x 18 bytes; times K and V
    assert memory.kv_row_bytes(m, "q8_0") == 2 * 8 * 34
    assert memory.kv_row_bytes(m, "q4_0") == 2 * 8 * 18
    with pytest.raises(QuantkitError, match="llama.cpp"):
        memory.kv_cache(m, 512, kv_type="q8_0", runtime="torch")


# ---------------------------------------------------------------- speed

def test_decode_bound_issue_example():
    bw = hardware.device("ddr4-3600-4ch").bandwidth      # 3600e6 x 8 B x 4 channels
    assert bw == 115.2e9
    assert speed.decode_upper_bound(bw, 13e9) == pytest.approx(8.86, abs=0.01)


def test_moe_reads_only_active_experts():
    m = from_name("mixtral-8x7b")
    ts = formats.tensor_bytes(m, "bf16")
    experts = 32 * 8 * 3 * 4096 * 14336               # 45.1 B parameters in experts
    active = 46_702_792_704 - experts + experts // 4    # 12.9 B active (Mistral's figure)
    assert active == pytest.approx(12.9e9, rel=0.01)
    embd = 32000 * 4096                                 # read one row per token, not all of it
    expected = 2 * (active - embd) + 4096 * 2
    # norms are f32 in the bf16 plan (GGUF convention): 2 extra bytes for each of 65 x 4096 values
    assert speed.weight_bytes_per_token(m, ts) == pytest.approx(expected + 2 * 65 * 4096 + 2 * 32 * 8 * 4096, rel=1e-6)


def test_split_decode_is_harmonic():
    # 1 GB at 100 GB/s + 1 GB at 10 GB/s: 0.01 s + 0.1 s per token
    assert speed.split_decode([(1e9, 100e9), (1e9, 10e9)]) == pytest.approx(1 / 0.11)


def _toy_model():
    """2 layers, hidden 256, tied 1000-token embedding: a hand-countable shape."""
    ts = [Tensor("token_embd.weight", (1000, 256), "q8_0", 1000 * 8 * 34)]
    for i in range(2):
        ts += [Tensor(f"blk.{i}.attn_q.weight", (256, 256), "q4_0", 256 * 8 * 18),
               Tensor(f"blk.{i}.ffn_down.weight", (256, 256), "q6_k", 256 * 210),
               Tensor(f"blk.{i}.attn_norm.weight", (256,), "f32", 1024)]
    return ModelShape(name="toy", arch="llama", n_layer=2, n_embd=256, n_head=4, n_head_kv=4, head_dim=64,
                      n_ff=256, n_vocab=1000, n_ctx_train=512, tied_embeddings=True, tensors=ts)


def test_cpu_decode_model_by_hand():
    m = _toy_model()
    cm = speed.CpuDecodeModel("toy", 1, 10e9, 1e-4, 2e-5,
                              {"q8_0": 1e-11, "q4_0": 5e-11, "q4_0+repack": 3e-11, "q6_k": 4e-11}, "test")
    t = speed.cpu_decode_terms(m, m.tensors, n_past=100)
    # q4_0 [256, 256] rows are a multiple of 8: ggml-cpu repacks them; the tied embedding is the head
    assert t["weights_by_kind"] == {"q8_0": 256_000, "q4_0+repack": 2 * 65_536, "q6_k": 2 * 65_536}
    # KV: 2 layers x 100 cells x (K + V) 256 values x 2 bytes (f16)
    assert t["kv_bytes"] == 2 * 100 * 2 * 256 * 2
    weights = 1000 * 8 * 34 + 2 * (256 * 8 * 18 + 256 * 210 + 1024)
    assert t["bytes"] == weights + t["kv_bytes"]
    s = 1e-4 + 2 * 2e-5 + t["bytes"] / 10e9 + 256_000 * 1e-11 + 131_072 * 3e-11 + 131_072 * 4e-11
    assert cm.seconds(m, m.tensors, 100) == pytest.approx(s, rel=1e-12)
    # a repackable type measured only in its plain layout falls back to that cost; an unknown one is an error
    assert speed.CpuDecodeModel("t", 1, 1e9, 0, 0, {"q4_0": 7e-11}, "").c("q4_0+repack") == 7e-11
    with pytest.raises(QuantkitError, match="iq2_xs"):
        cm.c("iq2_xs")


def test_cpu_speed_calibration_is_data_with_a_source(bundled_gguf):
    cm = speed.cpu_model()
    assert cm is not None and "plan_speed_calibrate.py" in cm.source
    assert cm.bandwidth > 1e9 and cm.o_token >= 0 and cm.o_layer >= 0
    assert all(v >= 0 for v in cm.c_per_weight.values())
    # every type llama.cpp's mixes put into the bundled Gemma file has a calibrated cost
    m = load(bundled_gguf)
    assert cm.covers(m, m.tensors)
    p = plan(bundled_gguf, PlanOptions(devices=["calibrated-cpu"], formats=["q4_k_m", "q8_0"], n_ctx=4096))
    q4, q8 = (r.cells[0] for r in p.rows)
    assert q4.decode_expected == pytest.approx(1 / cm.seconds(m, m.tensors, 2048))
    assert 0 < q4.decode_expected < q4.decode_upper and 0 < q8.decode_expected < q8.decode_upper
    assert "cpu-speed" in p.footnotes


def test_torch_cpu_resident_by_hand():
    m = _toy_model()
    ts = formats.tensor_bytes(m, "fp32")
    w = 4 * (256_000 + 4 * 65_536 + 2 * 256)
    assert formats.total(ts) == w
    n = 64
    hid = n * 256 * 4
    q = kv = n * 4 * 64 * 4                       # 4 heads = 4 KV heads x 64: no repeat_kv copies
    mask = n * n * 4                              # no sliding window: one fp32 mask
    scores = 4 * n * n * 4
    rope = 2 * n * 64 * 4                         # cos and sin of the one layer kind
    attn = mask + 2 * scores + 2 * hid + q + 2 * kv + rope + 2 * q
    mlp = mask + scores + 2 * hid + 3 * n * 256 * 4
    logits = 32 * 1000 * 4 + hid                  # the second half of 64 tokens
    f = memory.torch_cpu_forward(m, n)
    assert (f["masks"], f["attention"], f["mlp"], f["logits"]) == (mask, attn, mlp, logits)
    # every tensor here is below glibc's 32 MiB mmap threshold: all of a stage comes from the heap,
    # the heap grows to the larger stage, and only the logits (also heap-sized here) add to it
    assert f["heap"] == max(attn, mlp)
    assert f["peak"] == f["heap"] + logits
    heap = memory.GLIBC_TRIM_THRESHOLD
    assert heap == 64 * (1 << 20)
    # from a GGUF: reader header objects + file pages + a float32 copy of every non-F32 tensor
    # + the model's parameters + the free heap glibc keeps (64 MiB)
    load_peak = (memory.TORCH_CPU_BASE + 1000 * memory.GGUF_READER_BYTES_PER_TOKEN + m.stored_bytes
                 + 4 * (256_000 + 4 * 65_536) + w + heap)
    forward = memory.TORCH_CPU_BASE + w + heap + f["peak"]
    parts = memory.torch_cpu_parts(m, ts, n, from_gguf=True)
    assert (parts["load"], parts["forward"]) == (load_peak, forward)
    assert memory.torch_cpu_resident(m, ts, n, from_gguf=True) == max(load_peak, forward)
    assert memory.torch_cpu_resident(m, ts, n, from_gguf=False) == max(memory.TORCH_CPU_BASE + w, forward)


def test_torch_cpu_forward_gqa_sliding_window_and_mmap_threshold():
    # Gemma-3-270M's shape at 4096 tokens: 4 heads, 1 KV head x 256, two masks (full + sliding)
    m = ModelShape(name="g", arch="gemma3", n_layer=6, n_embd=640, n_head=4, n_head_kv=1, head_dim=256,
                   n_ff=2048, n_vocab=262_144, n_ctx_train=32_768, tied_embeddings=True, sliding_window=512,
                   sliding_window_pattern=[True] * 5 + [False])
    n = 4096
    f = memory.torch_cpu_forward(m, n)
    assert f["masks"] == 2 * n * n * 4                                   # 2 x 67 MB, mmap'd
    hid, q, kv = n * 640 * 4, n * 1024 * 4, n * 256 * 4                  # 10.5, 16.8, 4.2 MB: heap
    # heap: residual + hidden, q, k, v, cos/sin of 2 layer kinds, repeat_kv k and v, output + copy
    assert f["heap"] == 2 * hid + q + 2 * kv + 2 * 2 * n * 256 * 4 + 2 * q + 2 * q   # 130 MB
    # the MLP's [4096, 2048] fp32 tensors are exactly 32 MiB: mmap'd, not heap
    assert n * 2048 * 4 == memory.GLIBC_MMAP_THRESHOLD_MAX
    assert f["logits"] == 2048 * 262_144 * 4 + hid                       # 2.15 GB: the largest stage
    assert f["peak"] == f["heap"] + f["logits"]
    # logits grow as n/2 x 1 MiB, eager attention as 40 n^2 bytes: attention wins only above ~13k tokens
    g = memory.torch_cpu_forward(m, 16384)
    assert g["attention"] > g["logits"] and g["peak"] < g["heap"] + g["attention"]


def test_plan_torch_fp32_rss_matches_the_benchmark(bundled_gguf):
    """The plan's numbers as benchmarks/results/plan_torch_rss.json recorded them (the measured
    peaks are within 5%: BENCHMARKS.md, Plan)."""
    res = json.load(open(os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "results", "plan_torch_rss.json")))
    for c in res["cases"]:
        p = plan(bundled_gguf, PlanOptions(runtime="torch", formats=["fp32"], n_ctx=c["n_ctx"]))
        assert p.rows[0].cpu_resident == c["planned_peak_rss"]
        assert abs(c["error"]) <= 0.05
    assert "glibc" in p.footnotes and "eager" in p.footnotes


LLAMA_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k")


def test_plan_llama_cpp_matches_the_benchmark_on_every_type_and_context(bundled_gguf):
    """benchmarks/plan_vs_measured.json: llama.cpp on Gemma-3-270M, 13 GGUF file types x n_ctx
    512 / 4096 / 32768. Every case: peak RSS within 5% of measured, decode tokens/s within 25%,
    the KV cache as llama.cpp logged it; the plan's weight bytes equal, to the byte, the tensor data
    of the file llama.cpp's quantizer wrote and of the file quantkit wrote (both read with gguf-py),
    tensor by tensor. The plan columns are what the code plans today (the JSON is not stale)."""
    res = json.load(open(os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "plan_vs_measured.json")))
    cases = {(c["format"], c["n_ctx"]): c for c in res["cases"]}
    assert set(cases) == {(t, n) for t in LLAMA_TYPES for n in (512, 4096, 32768)}
    m = load(bundled_gguf)
    for (ft, n_ctx), c in cases.items():
        assert abs(c["planned_rss"] / c["measured_peak_rss"] - 1) <= 0.05, (ft, n_ctx)
        assert abs(c["planned_decode_tps"] / c["measured_decode_tps"] - 1) <= 0.25, (ft, n_ctx)
        assert c["planned_weight_bytes"] == c["file_weight_bytes"] == c["quantkit_file_weight_bytes"], ft
        assert c["planned_kv"] == c["logged_kv"]
        ts = formats.tensor_bytes(m, ft)
        inf = memory.inference(m, ft, n_ctx, tensors=ts)
        assert inf.weights == c["planned_weight_bytes"]
        assert memory.cpu_resident(m, inf, n_prompt=128) == c["planned_rss"], (ft, n_ctx)
        assert 1 / speed.cpu_model().seconds(m, ts, 96) == pytest.approx(c["planned_decode_tps"], rel=1e-9)
    for ft in LLAMA_TYPES:
        w = res["weight_files"][ft]
        for writer in ("llama.cpp", "quantkit"):
            f = w[writer]
            assert f["file_weight_bytes"] == w["planned_weight_bytes"], (ft, writer)
            assert f["n_tensor_mismatches"] == 0 and f["layout_ok"], (ft, writer)


def test_plan_torch_fp32_rss_grows_with_the_scored_logits(bundled_gguf):
    rows = [plan(bundled_gguf, PlanOptions(runtime="torch", formats=["fp32"], n_ctx=n)).rows[0] for n in (512, 8192)]
    assert rows[0].cpu_resident is not None
    # 8192 tokens keep 4096 rows of 262,144 fp32 logits (4 GiB): far above the load peak
    assert rows[1].cpu_resident - rows[0].cpu_resident > 4 * GIB - 2 * GIB


# ---------------------------------------------------------------- training

def test_training_full_is_16_bytes_per_parameter():
    t = memory.training(from_name("llama-2-7b"), "full", 512)
    assert t.weights + t.gradients + t.optimizer == 16 * 6_738_415_616
    assert t.activations_checkpointed < t.activations


def test_lora_trainable_parameters_match_peft():
    m = from_name("llama-2-7b")
    # PEFT prints these for Llama-2-7b: r=8 on q_proj,v_proj and r=64 on all linear layers (QLoRA)
    assert memory.training(m, "lora", 512, rank=8, targets="q,v").trainable_params == 4_194_304
    q = memory.training(m, "qlora", 512, rank=64)
    assert q.trainable_params == 159_907_840
    # NF4 base: 4.127 bits for block linears, embeddings and head in 16 bits
    lin = 6_738_415_616 - 2 * 32000 * 4096 - 65 * 4096
    assert q.weights - 4 * q.trainable_params == pytest.approx(lin * 4.127 / 8 + 2 * (2 * 32000 * 4096 + 65 * 4096), rel=1e-3)


# ---------------------------------------------------------------- planning and CLI

def test_plan_fit_partial_and_no():
    m = from_name("llama-2-7b")
    big = plan(m, PlanOptions(vram_gb=80, bandwidth_gbs=2000, formats=["q4_0"]))
    assert big.rows[0].cells[0].status == "fits"
    mid = plan(m, PlanOptions(vram_gb=3, bandwidth_gbs=300, formats=["q4_0"]))
    c = mid.rows[0].cells[0]
    assert c.status == "partial" and 0 < c.layers_on_gpu < 32
    tiny = plan(m, PlanOptions(vram_gb=0.3, bandwidth_gbs=300, formats=["q4_0"]))
    assert tiny.rows[0].cells[0].status == "no"


def test_cli_plan_gguf_json(bundled_gguf, capsys, monkeypatch):
    rc, out, err = run_cli(["plan", bundled_gguf, "--ctx", "32768", "--device", "ddr4-3200-2ch", "--json"],
                           capsys, monkeypatch)
    assert rc == 0, err
    d = json.loads(out)
    row = next(r for r in d["formats"] if r["format"] == "q4_k_m")
    assert row["memory"]["weights"] == 246_587_904          # the file's tensor bytes
    assert row["memory"]["kv"] == 116_391_936
    assert d["footnotes"]


def test_cli_plan_table_and_training(capsys, monkeypatch):
    rc, out, err = run_cli(["plan", "llama-2-13b", "--device", "rtx-3060", "--train", "qlora", "--rank", "64"],
                           capsys, monkeypatch)
    assert rc == 0, err
    assert "Assumptions:" in out and "[qlora]" in out and "rtx-3060" in out


@pytest.mark.parametrize("argv,needle", [
    (["plan", "llama-2-13", "--device", "rtx-3060"], "llama-2-13b"),
    (["plan", "llama-2-13b", "--device", "rtx3090"], "rtx-3090"),
    (["plan", "llama-2-13b", "--ctx", "-1"], "--ctx"),
    (["plan", "llama-2-13b", "--vram", "12"], "--bandwidth"),
    (["plan", "llama-2-13b", "--vram", "1e9", "--bandwidth", "300"], "--vram"),
    (["plan", "llama-2-13b", "--batch", "0"], "--batch"),
    (["plan", "llama-2-13b", "--runtime", "torch", "--kv-type", "q8_0"], "llama.cpp"),
    (["plan", "llama-2-13b", "--format", "q9_9"], "unknown format"),
    (["plan", "./nope.gguf"], "no such file"),
    (["plan"], "no MODEL"),
])
def test_cli_bad_input_is_one_line(argv, needle, capsys, monkeypatch):
    rc, out, err = run_cli(argv, capsys, monkeypatch)
    assert rc == 2
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def _write_safetensors(path, tensors):
    hdr, off = {}, 0
    for name, shape in tensors.items():
        n = 2
        for s in shape:
            n *= s
        hdr[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(hdr).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"\0" * off)


def test_hf_dir_header_only_and_missing_fields(tmp_path, capsys, monkeypatch):
    cfg = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1, "hidden_size": 64,
           "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 256,
           "max_position_embeddings": 1024, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shapes = {"model.embed_tokens.weight": (256, 64), "lm_head.weight": (256, 64), "model.norm.weight": (64,),
              "model.layers.0.input_layernorm.weight": (64,), "model.layers.0.post_attention_layernorm.weight": (64,),
              "model.layers.0.self_attn.q_proj.weight": (64, 64), "model.layers.0.self_attn.k_proj.weight": (32, 64),
              "model.layers.0.self_attn.v_proj.weight": (32, 64), "model.layers.0.self_attn.o_proj.weight": (64, 64),
              "model.layers.0.mlp.gate_proj.weight": (128, 64), "model.layers.0.mlp.up_proj.weight": (128, 64),
              "model.layers.0.mlp.down_proj.weight": (64, 128)}
    _write_safetensors(tmp_path / "model.safetensors", shapes)
    m = load(str(tmp_path))
    n = sum(a * (b if b else 1) for a, b in ((s[0], s[1] if len(s) > 1 else 0) for s in shapes.values()))
    assert m.n_params == n and m.stored_bytes == 2 * n and m.stored_format == "f16"
    assert m.n_head_kv == 2 and m.head_dim == 16
    # KV: 1 layer x 1024 tokens x (K+V) x 2 heads x 16 x 2 bytes
    assert memory.kv_cache(m, 1024, runtime="torch").total == 1024 * 2 * 32 * 2
    del cfg["hidden_size"], cfg["vocab_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    rc, out, err = run_cli(["plan", str(tmp_path)], capsys, monkeypatch)
    assert rc == 2 and "hidden_size" in err and "vocab_size" in err


def test_truncated_safetensors_is_a_clear_error(tmp_path, capsys, monkeypatch):
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    rc, out, err = run_cli(["plan", str(p)], capsys, monkeypatch)
    assert rc == 2 and "safetensors" in err


def test_cli_plan_list_devices_includes_the_calibrated_cpu(capsys, monkeypatch):
    rc, out, _ = run_cli(["plan", "--list-devices"], capsys, monkeypatch)
    assert rc == 0
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert "rtx-3060" in names or any(n.startswith("rtx-") for n in names)
    if hardware.calibrated_cpu() is not None:
        assert hardware.CALIBRATED_CPU in names


def _raw_safetensors(path, header, data_bytes=0):
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"\0" * data_bytes)
    return path


@pytest.mark.parametrize("header,data_bytes,needle", [
    ([1, 2], 0, "JSON list, not an object"),
    ({"w": {"shape": [2], "data_offsets": [0, 4]}}, 4, "tensor w has no dtype"),
    ({"w": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]}}, 4, "tensor w lies past the end"),
    ({"w": {"dtype": "F16", "shape": [2], "data_offsets": [4, 0]}}, 4, "not an ascending range"),
    ({"w": {"dtype": "F16", "shape": [2], "data_offsets": [-4, 0]}}, 4, "not an ascending range"),
    ({"w": {"dtype": "F16", "shape": [-2], "data_offsets": [0, 4]}}, 4, "non-negative integers"),
    ({"w": {"dtype": "F16", "shape": [3], "data_offsets": [0, 4]}}, 4, "4 bytes for shape [3] of F16"),
    ({"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]},
      "b": {"dtype": "F16", "shape": [2], "data_offsets": [2, 6]}}, 8, "tensors a and b overlap"),
    ({"w": "F16"}, 0, "entry is not a JSON object"),
])
def test_bad_safetensors_header_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch, header, data_bytes, needle):
    p = _raw_safetensors(tmp_path / "x.safetensors", header, data_bytes)
    rc, out, err = run_cli(["plan", str(p)], capsys, monkeypatch)
    assert rc == 2 and needle in err and str(p) in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_safetensors_header_read_as_stored(tmp_path):
    """Names in header order, dtypes lower-cased, bytes from the offsets (I32 GPTQ tensors too)."""
    from quantkit.plan.model import read_safetensors
    p = _raw_safetensors(tmp_path / "x.safetensors", {
        "__metadata__": {"format": "pt"},
        "b.qweight": {"dtype": "I32", "shape": [2, 3], "data_offsets": [0, 24]},
        "a.weight": {"dtype": "BF16", "shape": [3], "data_offsets": [24, 30]},
        "z.empty": {"dtype": "F32", "shape": [0], "data_offsets": [30, 30]}}, 30)
    ts = read_safetensors(str(p))
    assert [(t.name, t.shape, t.type, t.nbytes) for t in ts] == [
        ("b.qweight", (2, 3), "i32", 24), ("a.weight", (3,), "bf16", 6), ("z.empty", (0,), "f32", 0)]


def test_gguf_file_type_names_come_from_gguf_py():
    from quantkit.plan.model import file_type_name
    assert [file_type_name(v) for v in (0, 1, 15, 18, 30, 32)] == ["f32", "f16", "q4_k_m", "q6_k", "iq4_xs", "bf16"]
    assert file_type_name(999) == "ftype 999"


def test_truncated_gguf_is_a_clear_error(bundled_gguf, tmp_path, capsys, monkeypatch):
    p = tmp_path / "cut.gguf"
    with open(bundled_gguf, "rb") as f:
        p.write_bytes(f.read(5000))
    rc, out, err = run_cli(["plan", str(p)], capsys, monkeypatch)
    assert rc == 2 and "not a readable GGUF file" in err and str(p) in err and err.count("\n") == 1


def test_plan_reads_headers_without_torch(bundled_gguf):
    """`quantkit plan` stays fast: the planner and the header readers never import torch."""
    import subprocess
    import sys
    code = ("import sys; from quantkit.plan.planner import plan; from quantkit.plan.names import explain; "
            f"plan({bundled_gguf!r}); explain('llama-2-13b-gptq'); print('torch' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False", out.stderr
