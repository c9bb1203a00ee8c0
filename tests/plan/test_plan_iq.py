"""plan, inspect and explain on the IQ file types: the planned bytes of an IQ file are the
written file's, tensor by tensor (llama-quantize's mix with an importance matrix, which quantkit
writes byte for byte), from the F32 GGUF and from the Hugging Face directory alike; inspect
reads the same bytes back; explain names how IQ files are sized."""

from __future__ import annotations

import os

import pytest

from quantkit.plan import formats
from quantkit.plan.model import load

# iq3_xxs: attn_v takes IQ3_XXS with an imatrix (IQ3_S without one); iq2_xs: the lowest-bit mix
# (token embeddings in Q2_K, output in Q5_K); iq4_xs: the output in Q6_K
IQ_TYPES = ("iq4_xs", "iq3_xxs", "iq2_xs")


@pytest.fixture(scope="module")
def written(gptq_llama_dir, data_dir, tmp_path_factory) -> dict[str, str]:
    import quantkit.api as qk
    d = tmp_path_factory.mktemp("plan-iq")
    f32 = str(d / "tiny-f32.gguf")
    qk.quantize(str(gptq_llama_dir), f32, format="gguf:f32", show_progress=False)
    imx = str(d / "imatrix.gguf")
    qk.imatrix(f32, imx, calib=os.path.join(data_dir, "wikitext-2", "valid.txt"), nsamples=2, seqlen=64,
               show_progress=False)
    out = {"f32": f32, "hf": str(gptq_llama_dir)}
    for ft in IQ_TYPES:
        out[ft] = str(d / f"tiny-{ft}.gguf")
        qk.quantize(f32, out[ft], format=f"gguf:{ft}", imatrix=imx, show_progress=False)
    return out


@pytest.mark.parametrize("ft", IQ_TYPES)
def test_planned_iq_bytes_are_the_written_files(written, ft):
    import quantkit.api as qk
    f = load(written[ft])
    assert f.stored_format == ft
    stored = {t.name: (t.type, t.nbytes) for t in f.tensors}
    assert ft in {ty for ty, _ in stored.values()}                     # the file type's own type is there
    planned = {t.name: (t.type, t.nbytes) for t in formats.tensor_bytes(load(written["f32"]), ft)}
    assert planned == stored, {n: (planned.get(n), s) for n, s in stored.items() if planned.get(n) != s}
    # from the HF checkpoint: every matrix by name (the norms' names are the planner's own), the total
    hf = formats.tensor_bytes(load(written["hf"]), ft)
    assert {t.name: (t.type, t.nbytes) for t in hf if len(t.shape) == 2} == \
        {t.name: (t.type, t.nbytes) for t in f.tensors if len(t.shape) == 2}
    assert formats.total(hf) == f.stored_bytes
    info = qk.inspect(written[ft])
    assert info["tensor_bytes"] == sum(b for _, b in stored.values()) == f.stored_bytes
    assert info["types"][ft] >= 1


def test_iq3_xxs_mix_is_the_one_made_with_an_imatrix(written):
    types = {t.name: t.type for t in load(written["iq3_xxs"]).tensors}
    assert types["blk.0.attn_v.weight"] == "iq3_xxs"                    # IQ3_S without an imatrix


def test_explain_says_how_iq_files_are_sized():
    from quantkit.plan.names import explain
    i = explain("Llama-2-13B-chat-IQ3_XXS.gguf")
    assert i.qtype == "iq3_xxs"
    assert formats.IQ_NOTE in i.notes and "--imatrix" in formats.IQ_NOTE
