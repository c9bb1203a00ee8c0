"""IQ rungs in `quantkit eval --ladder`: round-to-nearest with an importance matrix computed from
the ladder's calibration (cached beside the rungs) or given with --imatrix; the rung is the very
file `quantize --format gguf:TYPE --imatrix` writes with that imatrix, it is re-used on a rerun,
and it appears in the results and the report. A tiny llama whose rows are multiples of 256, so
the IQ types apply without fallbacks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from gguf import GGUFReader

from quantkit.cli import main

ARGS = ["--chunks", "1", "--ctx", "128", "--threads", "1", "--no-speed"]


@pytest.fixture(scope="module")
def iq_cache(tmp_path_factory, bundled_gguf):
    old = os.environ.get("QUANTKIT_CACHE")
    os.environ["QUANTKIT_CACHE"] = str(tmp_path_factory.mktemp("qk-cache-iq"))
    yield os.environ["QUANTKIT_CACHE"]
    if old is None:
        os.environ.pop("QUANTKIT_CACHE", None)
    else:
        os.environ["QUANTKIT_CACHE"] = old


@pytest.fixture(scope="module")
def f32(gptq_llama_dir, tmp_path_factory) -> str:
    import quantkit.api as qk
    out = tmp_path_factory.mktemp("iq-ladder") / "tiny-f32.gguf"
    qk.quantize(str(gptq_llama_dir), str(out), format="gguf:f32", show_progress=False)
    return str(out)


def _types(path: str) -> set[str]:
    return {t.tensor_type.name for t in GGUFReader(path).tensors}


def _meta(path: str, key: str):
    f = GGUFReader(path).fields[key]
    return bytes(f.parts[f.data[0]]).decode()


@pytest.mark.usefixtures("one_thread")
def test_ladder_iq_rungs_take_a_cached_imatrix(f32, data_dir, iq_cache, tmp_path, capsys):
    import quantkit.api as qk
    text = os.path.join(data_dir, "wikitext-2", "test.txt")
    calib = os.path.join(data_dir, "wikitext-2", "valid.txt")
    report = tmp_path / "report.html"
    argv = ["eval", f32, "--ladder", "q4_0,iq4_xs,iq2_xs", "--calib", calib, "--nsamples", "4", "--seqlen", "64",
            "--text", text, *ARGS]

    def run(*extra):
        assert main([*argv, *extra, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        return out, {r.get("rung"): r for r in out["models"]}

    out, rows = run("--report", str(report))
    assert [r["rung"] for r in out["models"]] == ["reference", "Q4_0 RTN", "IQ4_XS RTN", "IQ2_XS RTN"]
    assert rows["IQ4_XS RTN"]["method"] == "rtn" and rows["IQ4_XS RTN"]["file_type"] == "iq4_xs"
    assert "4 x 64 tokens of" in out["meta"]["ladder"]["imatrix"] and calib in out["meta"]["ladder"]["imatrix"]
    assert out["meta"]["ladder"]["reused"] == []
    # smaller files, worse scores down the ladder, every score finite
    assert rows["Q4_0 RTN"]["file_bytes"] > rows["IQ4_XS RTN"]["file_bytes"] > rows["IQ2_XS RTN"]["file_bytes"]
    assert 0 < rows["IQ4_XS RTN"]["kld_mean"] < rows["IQ2_XS RTN"]["kld_mean"] < 10
    html = report.read_text(encoding="utf-8")
    assert "IQ4_XS RTN" in html and "IQ2_XS RTN" in html

    iq4, iq2 = rows["IQ4_XS RTN"]["path"], rows["IQ2_XS RTN"]["path"]
    assert "IQ4_XS" in _types(iq4) and "IQ2_XS" in _types(iq2)
    where = Path(iq4).parent
    assert where.name.startswith("imatrix-") and Path(iq2).parent == where      # one sub-folder per imatrix
    cached = list(where.parent.glob("imatrix-*.gguf"))
    assert len(cached) == 1
    assert _meta(iq4, "quantize.imatrix.file") == str(cached[0])
    # the rung is quantize --imatrix's file, byte for byte (llama-quantize's with the same imatrix)
    direct = tmp_path / "direct-iq4_xs.gguf"
    qk.quantize(f32, str(direct), format="gguf:iq4_xs", imatrix=str(cached[0]), show_progress=False)
    assert direct.read_bytes() == Path(iq4).read_bytes()
    # the Q4_0 rung stays plain round-to-nearest, outside the imatrix folder
    assert Path(rows["Q4_0 RTN"]["path"]).parent == where.parent

    stamp = cached[0].stat().st_mtime_ns
    again, rows2 = run()                                   # cached: nothing rebuilt, the imatrix not recomputed
    assert again["meta"]["ladder"]["reused"] == ["Q4_0 RTN", "IQ4_XS RTN", "IQ2_XS RTN"]
    assert rows2["IQ2_XS RTN"]["path"] == iq2 and cached[0].stat().st_mtime_ns == stamp

    # --imatrix FILE: that file weights the IQ rungs, which go to another sub-folder
    mine = tmp_path / "mine.gguf"
    qk.imatrix(f32, str(mine), calib=calib, nsamples=2, seqlen=64, show_progress=False)
    other, rows3 = run("--imatrix", str(mine))
    assert other["meta"]["ladder"]["reused"] == ["Q4_0 RTN"]
    assert Path(rows3["IQ4_XS RTN"]["path"]).parent != where
    assert _meta(rows3["IQ4_XS RTN"]["path"], "quantize.imatrix.file") == str(mine)
    assert f"importance matrix {mine}" in other["meta"]["ladder"]["imatrix"]
    assert "--imatrix" in other["meta"]["command"]


def _fails(argv, capsys, *needles):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def test_ladder_iq_bad_input(f32, data_dir, iq_cache, tmp_path, capsys):
    text = os.path.join(data_dir, "wikitext-2", "test.txt")
    _fails(["eval", f32, "--ladder", "iq4_xs", "--imatrix", str(tmp_path / "none.gguf"), "--text", text, *ARGS],
           capsys, "none.gguf", "no such importance matrix")
    _fails(["eval", f32, "--ladder", "iq4_xs+gptq", "--text", text, *ARGS], capsys, "iq4_xs+gptq", "not available")
    _fails(["eval", f32, "--imatrix", str(tmp_path / "x.gguf"), "--text", text, *ARGS], capsys, "with --ladder")
    _fails(["eval", f32, "--ladder", "iq3_s", "--calib", text, "--text", text, *ARGS], capsys,
           "is the scored text")
    assert not list(tmp_path.iterdir())
