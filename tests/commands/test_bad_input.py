"""Every bad input ends in one clear line naming the file, a non-zero exit, no traceback, and no
partial output file."""

import os
import signal
import subprocess
import sys
import time

import pytest

from quantkit.cli import main
from helpers.cli import assert_one_line, no_partial, run_cli


def test_missing_path(tmp_path, capsys):
    p = str(tmp_path / "nope.gguf")
    code, err = run_cli(["inspect", p], capsys)
    assert code == 2
    assert_one_line(err, p, "no such file")


def test_directory_without_config(tmp_path, capsys):
    code, err = run_cli(["inspect", str(tmp_path)], capsys)
    assert code == 2
    assert_one_line(err, str(tmp_path), "config.json")


def test_truncated_gguf(bundled_gguf, tmp_path, capsys):
    bad = tmp_path / "cut.gguf"
    with open(bundled_gguf, "rb") as f:
        bad.write_bytes(f.read(3_000_000))          # header and part of the vocabulary only
    code, err = run_cli(["inspect", str(bad)], capsys)
    assert code == 2
    assert_one_line(err, str(bad), "truncated")


def test_not_a_gguf(tmp_path, capsys):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"not a model at all" * 100)
    code, err = run_cli(["quantize", str(bad), "-o", str(tmp_path / "out.gguf")], capsys)
    assert code == 2
    assert_one_line(err, str(bad))
    assert not (tmp_path / "out.gguf").exists()


def test_corrupt_safetensors(tmp_path, capsys):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad")
    code, err = run_cli(["inspect", str(d)], capsys)
    assert code == 2
    assert_one_line(err, str(d))


def test_unsupported_architecture(tmp_path, capsys):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text('{"architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper"}')
    code, err = run_cli(["inspect", str(d)], capsys)
    assert code == 2
    assert_one_line(err, "WhisperForConditionalGeneration", "LlamaForCausalLM")


def test_unknown_type_name(bundled_gguf, tmp_path, capsys):
    code, err = run_cli(["quantize", bundled_gguf, "--format", "gguf:q3_0", "-o", str(tmp_path / "o.gguf")], capsys)
    assert code == 2
    assert_one_line(err, "q3_0", "q4_0")
    assert no_partial(tmp_path)


def test_unknown_format(bundled_gguf, tmp_path, capsys):
    code, err = run_cli(["quantize", bundled_gguf, "--format", "onnx", "-o", str(tmp_path / "o.gguf")], capsys)
    assert code == 2
    assert_one_line(err, "onnx")


@pytest.mark.parametrize("kind", ["missing_dir", "parent_is_file", "is_dir"])
def test_unwritable_output(bundled_gguf, tmp_path, capsys, kind):
    (tmp_path / "afile").write_text("x")
    out = {"missing_dir": tmp_path / "no" / "o.gguf", "parent_is_file": tmp_path / "afile" / "o.gguf",
           "is_dir": tmp_path}[kind]
    code, err = run_cli(["quantize", bundled_gguf, "--format", "gguf:q8_0", "-o", str(out)], capsys)
    assert code == 2
    assert_one_line(err, "output")
    assert not any("partial" in f for f in os.listdir(tmp_path))


def _child(args, limit_bytes=None):
    pre = "import resource, signal, sys\n"
    if limit_bytes:
        # A file-size limit fails write() with EFBIG mid-file, as a full disk fails it with ENOSPC.
        pre += ("signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
                f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_bytes}, {limit_bytes}))\n")
    pre += f"from quantkit.cli import main\nsys.exit(main({args!r}))\n"
    return [sys.executable, "-c", pre]


def test_out_of_space_mid_write(bundled_gguf, tmp_path):
    out = tmp_path / "o.gguf"
    r = subprocess.run(_child(["quantize", bundled_gguf, "--format", "gguf:q8_0", "-o", str(out)], 20_000_000),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert_one_line(r.stderr, str(out), "out of space")
    assert os.listdir(tmp_path) == []


def test_ctrl_c_leaves_nothing(bundled_gguf, tmp_path):
    out = tmp_path / "o.gguf"
    p = subprocess.Popen(_child(["quantize", bundled_gguf, "--format", "gguf:q4_0", "-o", str(out)]),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any("partial" in f for f in os.listdir(tmp_path)):
        time.sleep(0.05)
    assert any("partial" in f for f in os.listdir(tmp_path)), "writing never started"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130
    assert "Traceback" not in err and "interrupted" in err
    assert os.listdir(tmp_path) == []


def test_nan_in_weights_names_the_tensor(tmp_path, capsys):
    import numpy as np
    from helpers.tiny_models import write_minimal_llama_gguf

    good = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    bad = good.copy()
    bad[3, 5] = np.nan
    src = write_minimal_llama_gguf(tmp_path / "nan.gguf", {"blk.0.attn_q.weight": good, "blk.0.attn_k.weight": bad})
    out = tmp_path / "o.gguf"
    code, err = run_cli(["quantize", src, "--format", "gguf:q4_0", "-o", str(out)], capsys)
    assert code == 2
    assert_one_line(err, src, "blk.0.attn_k.weight", "1 NaN/Inf")
    assert sorted(os.listdir(tmp_path)) == ["nan.gguf"]


def test_unknown_tensor_type_override(bundled_gguf, tmp_path, capsys):
    code, err = run_cli(["quantize", bundled_gguf, "--format", "gguf:q4_0", "--output-tensor-type", "q9_9",
                         "-o", str(tmp_path / "o.gguf")], capsys)
    assert code == 2
    assert_one_line(err, "q9_9")
    assert os.listdir(tmp_path) == []


def test_directory_output_never_replaces_foreign_files(tmp_path):
    """A directory output replaces an empty directory or quantkit's own earlier output, never a
    folder of someone's files (`-o .`, `-o` the source model's folder), nor a file."""
    from quantkit.util.atomic import MARKER, atomic_output
    from quantkit.util.errors import QuantkitError
    out = tmp_path / "out"
    for run in range(2):                       # first write, then a rerun replacing its own output
        with atomic_output(out, directory=True) as tmp:
            (tmp_path / tmp / f"w{run}.txt").write_text("x")
        assert sorted(os.listdir(out)) == sorted([MARKER, f"w{run}.txt"])
    foreign = tmp_path / "model"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    with pytest.raises(QuantkitError, match="did not write"):
        with atomic_output(foreign, directory=True):
            raise AssertionError("must not start")
    (tmp_path / "f.bin").write_text("x")
    with pytest.raises(QuantkitError, match="existing file"):
        with atomic_output(tmp_path / "f.bin", directory=True):
            raise AssertionError("must not start")
    # a foreign folder that appears while the output is being written is not replaced either
    late = tmp_path / "late"
    with pytest.raises(QuantkitError, match="did not write"):
        with atomic_output(late, directory=True) as tmp:
            (tmp_path / tmp / "w.txt").write_text("x")
            late.mkdir()
            (late / "mine.txt").write_text("keep")
    assert os.listdir(late) == ["mine.txt"]
    assert sorted(os.listdir(tmp_path)) == ["f.bin", "late", "model", "out"]     # no temporaries left
    assert os.listdir(foreign) == ["config.json"]


def test_gguf_format_rejects_integer_grid_flags(capsys, tmp_path):
    out = str(tmp_path / "x.gguf")
    code, err = run_cli(["quantize", "--format", "gguf:q4_0", "--bits", "3", "--group-size", "32", "-o", out], capsys)
    assert code == 2
    assert_one_line(err, "--bits/--group-size do not apply to --format gguf:q4_0")
    code, err = run_cli(["quantize", "--format", "gguf:q4_1", "--asym", "-o", out], capsys)
    assert code == 2
    assert_one_line(err, "--asym do not apply")
    assert os.listdir(tmp_path) == []


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["quantize", "--bits", "7", "-o", "x"])
    assert e.value.code == 2
    assert_one_line(capsys.readouterr().err, "quantkit quantize: error: argument --bits: invalid choice: 7",
                    "quantkit quantize --help")


def test_unforeseen_os_error_is_one_line(tmp_path, capsys, monkeypatch):
    """A system error that no check caught (here: the config file cannot be read) is one line."""
    import builtins
    cfg = tmp_path / "q.yaml"
    cfg.write_text("method: rtn\n")
    real_open = builtins.open

    def deny(path, *a, **k):
        if os.fspath(path) == str(cfg):
            raise PermissionError(13, "Permission denied", str(cfg))
        return real_open(path, *a, **k)
    monkeypatch.setattr(builtins, "open", deny)
    code, err = run_cli(["quantize", "--config", str(cfg), "-o", str(tmp_path / "x.gguf")], capsys)
    assert code == 2
    assert_one_line(err, str(cfg), "Permission denied")
