"""The measured check of a budgeted mix (quant.budget_check) on a tiny llama: where the additive
estimate is wrong (decoder costs priced 50x too low, as the summed estimate underpriced the
many lossy decoder tensors of Gemma-3-270M's Q4_K_S-size mix), the check keeps a runner-up that
measures better, within the same byte budget, and that file is the better one in llama.cpp too."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from helpers.llama_logits import chunk_logits, kld
from quantkit.models.open import open_model
from quantkit.quant.budget import Budget, plan_mix
from quantkit.quant.budget_check import MixProbe, check_mix, runner_up_restrictions
from quantkit.quant.sensitivity import HEAD_NAMES
from quantkit.quant.sensitivity_pass import SensitivityPass

pytestmark = pytest.mark.usefixtures("one_thread")
TYPES = ["f16", "q8_0", "q6_k", "q5_k", "q4_k", "q3_k", "q2_k", "q5_0", "q4_0"]
UNDERPRICE = 0.02            # the wrong estimate: every decoder linear's cost x this


@pytest.fixture(scope="module")
def tiny(gptq_llama_dir, data_dir):
    calib = str(Path(data_dir) / "wikitext-2" / "valid.txt")
    src = open_model(str(gptq_llama_dir))
    sens = SensitivityPass(src, src.path, calib, 4, 64, show_progress=False).measure(types=TYPES)
    yield src, calib, sens
    src.close()


def _true_sum(sens, mix) -> float:
    return sum(sens.tensors[n].costs[t] for n, t in mix.types.items() if n in sens.tensors)


def test_runner_ups_hold_each_head_at_each_type_and_the_decoder_lossless(tiny):
    _, _, sens = tiny
    labels = [label for label, _ in runner_up_restrictions(sens)]
    for h in HEAD_NAMES:
        assert {f"{h.split('.')[0]} at {t.upper()}" for t in sens.tensors[h].costs} <= set(labels)
    label, restrict = runner_up_restrictions(sens)[-1]
    assert label == "decoder lossless"
    assert set(restrict) == set(sens.tensors) - set(HEAD_NAMES)
    assert all(restrict[n] == {"f16"} or "f16" in restrict[n] for n in restrict)


def test_check_keeps_the_measured_better_mix_when_the_sum_is_wrong(tiny, tmp_path):
    src, calib, sens = tiny
    wrong = copy.deepcopy(sens)
    for n, c in wrong.tensors.items():
        if n not in HEAD_NAMES:
            c.costs = {t: v * UNDERPRICE for t, v in c.costs.items()}
    budget = Budget("bpw", 4.5)
    chosen = plan_mix(wrong, budget, src.metadata)
    probe = MixProbe(src, src.path, sens, calib, 64, str(tmp_path / "mixes.json"))
    kept, cands = check_mix(wrong, budget, src.metadata, chosen, probe)
    assert cands[0].label == "allocation" and cands[0].mix is chosen
    measured = [c for c in cands if c.measured is not None]
    assert len(measured) >= 2 and probe.n_probed == len(measured)
    best = min(measured, key=lambda c: c.measured)
    assert kept is best.mix and kept is not chosen
    assert best.measured < 0.9 * cands[0].measured
    assert any("measured check: kept" in note for note in kept.notes)
    assert kept.checks[0]["label"] == "allocation" and len(kept.checks) == len(cands)
    # the byte budget holds exactly as for the knapsack's own mix
    assert kept.budget_bytes == chosen.budget_bytes and kept.file_bytes <= kept.budget_bytes
    assert kept.tensor_bytes * 8 <= 4.5 * sens.n_params()
    # the estimate with the true decoder costs agrees with the measurement
    assert _true_sum(sens, kept) < _true_sum(sens, chosen)
    # and so does llama.cpp on text the probes never saw: the two mixes written as files
    from quantkit.quant.gguf_export import export_gguf
    from quantkit.quant.budget import mix_file_type
    text = (Path(calib).parent / "test.txt").read_text(encoding="utf-8")[:20000]
    paths = {}
    for name, mix in (("ref", None), ("chosen", chosen), ("kept", kept)):
        paths[name] = tmp_path / f"{name}.gguf"
        if mix is None:
            export_gguf(src, str(paths[name]), "f32", show_progress=False)
        else:
            export_gguf(src, str(paths[name]), mix_file_type(mix.plan), plan=mix.plan, show_progress=False)
    ref = chunk_logits(paths["ref"], text)
    assert kld(ref, chunk_logits(paths["kept"], text)) < kld(ref, chunk_logits(paths["chosen"], text))
    # measured mixes are cached: a second check at the same budget probes nothing
    again = MixProbe(src, src.path, sens, calib, 64, str(tmp_path / "mixes.json"))
    kept2, _ = check_mix(wrong, budget, src.metadata, plan_mix(wrong, budget, src.metadata), again)
    assert again.n_probed == 0 and again.prober is None
    assert kept2.types == kept.types


def test_check_keeps_the_allocation_when_no_runner_up_measures_better(tiny):
    """With one candidate per head type and the decoder lossless, a budget that holds every
    tensor at F16 leaves no runner-up: the allocation is kept without a note."""
    src, calib, sens = tiny
    budget = Budget("bpw", 16.5)
    chosen = plan_mix(sens, budget, src.metadata)
    probe = MixProbe(src, src.path, sens, calib, 64)
    kept, cands = check_mix(sens, budget, src.metadata, chosen, probe)
    assert kept is chosen and len([c for c in cands if c.measured is not None]) == 1
    assert not any("measured check" in n for n in kept.notes)
