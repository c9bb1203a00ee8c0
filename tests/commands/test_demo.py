"""The README's main job, end to end: quantize the bundled model to a ladder, run each rung in
llama.cpp, score each against the F32 reference, print a table and write the HTML report.

Kept short: two RTN rungs and one chunk of 128 tokens. The GPTQ rung of the default ladder (minutes
of GPTQ on the bundled model) is tested on a tiny model in tests/eval/test_eval.py
(test_ladder_gptq_rung_beats_rtn_and_is_cached); here only its wiring, with `--types` parsing."""

import os

from quantkit.cli import main


def test_demo_prints_table_and_writes_runnable_files(bundled_gguf, tmp_path, capsys):
    code = main(["demo", "--out-dir", str(tmp_path), "--types", "q8_0,q4_0", "--max-tokens", "6",
                 "--eval-chunks", "1", "--eval-ctx", "128", "--threads", "1"])  # 1: llama.cpp's spinning threads crawl on busy cores
    out = capsys.readouterr().out
    assert code == 0
    lines = [l for l in out.splitlines() if l.startswith(("Q8_0", "Q4_0"))]
    rows, quality = lines[:2], lines[2:]
    assert [r.split()[:2] for r in rows] == [["Q8_0", "RTN"], ["Q4_0", "RTN"]]
    # what was lost: Q8_0 stays much closer to the F32 reference than Q4_0
    assert [q.split()[:2] for q in quality] == [["Q8_0", "RTN"], ["Q4_0", "RTN"]]
    kld = {q.split()[0]: float(q.split()[3]) for q in quality}
    assert 0 < kld["Q8_0"] < 0.01 < 0.05 < kld["Q4_0"]
    sizes = {r.split()[0]: float(r.split()[2].rstrip("MB")) for r in rows}
    assert sizes["Q4_0"] < sizes["Q8_0"]
    bpw = {r.split()[0]: float(r.split()[3]) for r in rows}
    assert 6.5 < bpw["Q4_0"] < bpw["Q8_0"] < 9.0      # the Q8_0 embedding dominates both files
    for r in rows:
        assert len(r.split()) > 8, f"no generated text in: {r}"  # columns past tok/s hold the output
    files = sorted(os.listdir(tmp_path))
    assert files == ["gemma-3-270m-q4_0.gguf", "gemma-3-270m-q8_0.gguf", "report.html"]
    assert f"report: {tmp_path / 'report.html'}" in out
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "Q4_0 RTN" in html and "rung (method)" in html
    assert "demo took" in out


def test_demo_rejects_bad_rungs(capsys):
    assert main(["demo", "--types", "q4_0,f16+gptq"]) == 2
    err = capsys.readouterr().err.strip()
    assert "GPTQ needs a quantized type" in err and "\n" not in err
    assert main(["demo", "--types", "q4_0-gtpq"]) == 2
    assert "unknown or unsupported ladder type" in capsys.readouterr().err
