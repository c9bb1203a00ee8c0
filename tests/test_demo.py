"""The README's main job, end to end: quantize the bundled model, run it in llama.cpp, print a table."""

import os

from quantkit.cli import main


def test_demo_prints_table_and_writes_runnable_files(bundled_gguf, tmp_path, capsys):
    code = main(["demo", "--out-dir", str(tmp_path), "--types", "q8_0,q4_0", "--max-tokens", "6",
                 "--eval-chunks", "1", "--eval-ctx", "128"])
    out = capsys.readouterr().out
    assert code == 0
    lines = [l for l in out.splitlines() if l.startswith(("Q8_0", "Q4_0"))]
    rows, quality = lines[:2], lines[2:]
    assert [r.split()[0] for r in rows] == ["Q8_0", "Q4_0"]
    # what was lost: Q8_0 stays much closer to the F32 reference than Q4_0
    assert [q.split()[0] for q in quality] == ["Q8_0", "Q4_0"]
    kld = {q.split()[0]: float(q.split()[2]) for q in quality}
    assert 0 < kld["Q8_0"] < 0.01 < 0.05 < kld["Q4_0"]
    sizes = {r.split()[0]: float(r.split()[1].rstrip("MB")) for r in rows}
    assert sizes["Q4_0"] < sizes["Q8_0"]
    bpw = {r.split()[0]: float(r.split()[2]) for r in rows}
    assert 6.5 < bpw["Q4_0"] < bpw["Q8_0"] < 9.0      # the Q8_0 embedding dominates both files
    for r in rows:
        assert len(r.split()) > 7, f"no generated text in: {r}"  # columns past tok/s hold the output
    files = sorted(os.listdir(tmp_path))
    assert files == ["gemma-3-270m-q4_0.gguf", "gemma-3-270m-q8_0.gguf", "report.html"]
    assert f"report: {tmp_path / 'report.html'}" in out
