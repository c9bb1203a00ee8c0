"""The README's main job, end to end: quantize the bundled model, run it in llama.cpp, print a table."""

import os

from quantkit.cli import main


def test_demo_prints_table_and_writes_runnable_files(bundled_gguf, tmp_path, capsys):
    code = main(["demo", "--out-dir", str(tmp_path), "--types", "q8_0,q4_0", "--max-tokens", "6"])
    out = capsys.readouterr().out
    assert code == 0
    rows = [l for l in out.splitlines() if l.startswith(("Q8_0", "Q4_0"))]
    assert [r.split()[0] for r in rows] == ["Q8_0", "Q4_0"]
    sizes = {r.split()[0]: float(r.split()[1].rstrip("MB")) for r in rows}
    assert sizes["Q4_0"] < sizes["Q8_0"]
    bpw = {r.split()[0]: float(r.split()[2]) for r in rows}
    assert 6.5 < bpw["Q4_0"] < bpw["Q8_0"] < 9.0      # the Q8_0 embedding dominates both files
    for r in rows:
        assert len(r.split()) > 7, f"no generated text in: {r}"  # columns past tok/s hold the output
    files = sorted(os.listdir(tmp_path))
    assert files == ["gemma-3-270m-q4_0.gguf", "gemma-3-270m-q8_0.gguf"]
