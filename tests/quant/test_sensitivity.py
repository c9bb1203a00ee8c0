"""Per-tensor, per-type KL estimates (quant.sensitivity) on a tiny llama: the candidate types
follow the registry and the block sizes, and the estimate ranks single-tensor changes as
measurement does (Spearman correlation over changes the probes did not fit on)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quantkit.models.open import open_model
from quantkit.quant.sensitivity import Sensitivity, candidate_types, roundtrip, spearman
from quantkit.quant.sensitivity_pass import SensitivityPass, measure_sensitivity

pytestmark = pytest.mark.usefixtures("one_thread")

# Measured on this model (8 x 128 calibration tokens, 24 changes, seed 1): 0.997.
MIN_SPEARMAN = 0.9


def test_candidates_follow_the_registry_and_the_blocks():
    wide = candidate_types((8, 512))
    assert {"f16", "q8_0", "q6_k", "q5_k", "q4_k", "q3_k", "q2_k", "q4_0", "q4_1", "q5_0", "q5_1"} <= set(wide)
    assert "f32" not in wide and "bf16" not in wide
    narrow = candidate_types((8, 640))                  # 640 = 2.5 x 256: no K-quant block fits
    assert not any(t.endswith("_k") for t in narrow) and "q8_0" in narrow
    from quantkit.codecs.registry import qtype
    sizes = [qtype(t).nbytes((1, 512)) for t in wide]
    assert sizes == sorted(sizes, reverse=True)


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254, abs=1e-6)


@pytest.fixture(scope="module")
def sens_pass(gptq_llama_dir, data_dir):
    calib = str(Path(data_dir) / "wikitext-2" / "valid.txt")
    src = open_model(str(gptq_llama_dir))
    sp = SensitivityPass(src, src.path, calib, 8, 128, show_progress=False)
    yield sp, sp.measure()
    src.close()


def test_estimate_ranks_changes_as_measurement_does(sens_pass):
    sp, sens = sens_pass
    v = sp.validate(sens, 24, seed=1)
    assert v["n"] == 24
    assert v["spearman"] >= MIN_SPEARMAN, v


def test_every_quantizable_tensor_is_priced(sens_pass):
    sp, sens = sens_pass
    names = set(sens.tensors)
    assert {"token_embd.weight", "output.weight"} <= names          # untied: both heads take part
    assert {f"blk.{i}.{k}.weight" for i in range(2) for k in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                              "ffn_gate", "ffn_up", "ffn_down")} <= names
    assert all(s[1] == "f32" for s in sens.fixed.values())             # the norms
    for n, c in sens.tensors.items():
        assert set(c.costs) == set(candidate_types(c.shape)), n
        assert c.costs["q2_k"] > c.costs["q8_0"] >= 0, n                  # fewer bits cost more
    # the scales came from probes at the first and last layer of every class
    assert {p["tensor"] for p in sens.probes} >= {"blk.0.ffn_down.weight", "blk.1.ffn_down.weight"}
    back = Sensitivity.from_json(sens.to_json())
    assert back.tensors["blk.1.attn_v.weight"].costs == sens.tensors["blk.1.attn_v.weight"].costs
    assert back.n_params() == sens.n_params() == sum(
        p.numel() for n, p in sp.model.named_parameters() if "rotary" not in n)


def test_measurement_is_cached(gptq_llama_dir, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path))
    calib = str(Path(data_dir) / "wikitext-2" / "valid.txt")
    src = open_model(str(gptq_llama_dir))
    try:
        a = measure_sensitivity(src, src.path, calib=calib, nsamples=2, seqlen=64, show_progress=False)
        assert list((tmp_path / "sensitivity").iterdir())
        torch.manual_seed(0)
        b = measure_sensitivity(src, src.path, calib=calib, nsamples=2, seqlen=64, show_progress=False)
    finally:
        src.close()
    assert b.to_json() == a.to_json()


def test_a_probe_replays_the_layers_before_its_tensor(sens_pass):
    """A probe of a layer-1 tensor that replays layer 0 from the reference pass measures what a
    full forward measures, and runs layer 0 not at all."""
    sp, _ = sens_pass
    name = "blk.1.ffn_down.weight"
    p = sp.params[name]
    changes = {p: roundtrip("q4_0", p.data)}
    full = sp.prober.kl(changes)
    calls = []
    inner = next(m for m in sp.prober.layers[0].modules() if isinstance(m, torch.nn.Linear))
    h = inner.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        replayed = sp.prober.kl(changes, first_layer=1)
    finally:
        h.remove()
    assert full > 0
    assert replayed == pytest.approx(full, rel=1e-6)
    assert calls == []
    assert sp.probe(name, "q4_0") == pytest.approx(full, rel=1e-6)
