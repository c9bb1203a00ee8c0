"""Outputs: never the input, never a device node or a FIFO, and a full disk is one line whoever
raised it (safetensors' own error type included), with nothing partial left."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys

import pytest

from helpers.cli import assert_one_line
from quantkit.util.atomic import atomic_output, check_output, io_error
from quantkit.util.errors import QuantkitError


def _special(tmp_path, kind: str) -> str:
    """A FIFO, a character device (1, 3: what /dev/null is) or a socket made in tmp_path; never the real /dev/null."""
    p = str(tmp_path / f"{kind}.node")
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "chardev":
        os.mknod(p, 0o666 | stat.S_IFCHR, os.makedev(1, 3))     # as root (the test machine's user)
    else:
        s = socket.socket(socket.AF_UNIX)
        s.bind(p)
        s.close()
    return p


@pytest.mark.parametrize("kind,what", [("fifo", "FIFO"), ("chardev", "character device"), ("socket", "socket")])
@pytest.mark.parametrize("directory", [False, True])
def test_special_files_are_never_replaced(tmp_path, kind, what, directory):
    node = _special(tmp_path, kind)
    mode = os.stat(node).st_mode
    with pytest.raises(QuantkitError, match=what) as e:
        check_output(node, directory=directory)
    assert node in str(e.value)
    with pytest.raises(QuantkitError, match=what):
        with atomic_output(node, directory=directory):
            raise AssertionError("must not start")
    assert os.stat(node).st_mode == mode                # still the node, not a regular file
    assert os.listdir(tmp_path) == [os.path.basename(node)]


def test_a_symlink_to_a_device_is_refused(tmp_path):
    node = _special(tmp_path, "chardev")
    link = tmp_path / "out.gguf"
    link.symlink_to(node)
    with pytest.raises(QuantkitError, match="character device"):
        check_output(link)


def test_output_that_is_the_input(tmp_path, monkeypatch):
    src = tmp_path / "model.gguf"
    src.write_bytes(b"GGUF")
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.gguf").symlink_to(src)
    os.link(src, tmp_path / "hard.gguf")
    monkeypatch.chdir(tmp_path)
    for out in (src, "model.gguf", "./model.gguf", "sub/../model.gguf", "link.gguf", "hard.gguf"):
        with pytest.raises(QuantkitError, match="is the input"):
            check_output(out, [str(src)])
    for given in ("./model.gguf", "link.gguf"):          # the input spelt another way
        with pytest.raises(QuantkitError, match="is the input"):
            check_output(src, [given])
    assert check_output("other.gguf", [str(src), None]) == str(tmp_path / "other.gguf")
    assert src.read_bytes() == b"GGUF"


def test_directory_output_and_input_apart(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"x")
    for out, inp, why in ((model, model, "is the input"), (tmp_path, model, "holds the input"),
                          (model / "int8", model, "lies inside the input"),
                          (tmp_path, model / "model.safetensors", "holds the input")):
        with pytest.raises(QuantkitError, match=why):
            check_output(out, [inp], directory=True)
    check_output(tmp_path / "elsewhere", [model], directory=True)
    # a file output may go beside the model's files, but not over one of them
    check_output(model / "q4_0.gguf", [model])
    with pytest.raises(QuantkitError, match="file of the input model directory"):
        check_output(model / "config.json", [model])


def test_file_where_directory_belongs_and_back(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(QuantkitError, match="existing file"):
        check_output(tmp_path / "f", directory=True)
    with pytest.raises(QuantkitError, match="existing directory"):
        check_output(tmp_path, directory=False)


def test_library_errors_carrying_a_system_error_are_mapped():
    """safetensors raises SafetensorError("... (os error 27)"), tokenizers a bare Exception: both
    are one line; an error with no system error in it is left alone."""
    from safetensors import SafetensorError
    err = io_error(SafetensorError("Error while serializing: I/O error: File too large (os error 27)"), "/x/out")
    assert err is not None and "out of space" in str(err) and "/x/out" in str(err)
    err = io_error(Exception("No space left on device"), "/x/out")
    assert err is not None and "out of space" in str(err)
    err = io_error(SafetensorError("I/O error: Permission denied (os error 13)"), "/x/out")
    assert err is not None and "Permission denied" in str(err)
    assert io_error(ValueError("shape mismatch"), "/x/out") is None
    assert io_error(PermissionError(13, "Permission denied"), "/x/out") is None    # the CLI names its file


def _limited(code: str, limit: int) -> subprocess.CompletedProcess:
    """Run CODE in a child whose files may not grow past LIMIT bytes (write() fails with EFBIG,
    as a full disk fails it with ENOSPC)."""
    pre = ("import resource, signal, sys\n"
           "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
           f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n")
    return subprocess.run([sys.executable, "-c", pre + code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_full_disk_writing_a_safetensors_checkpoint(tmp_path):
    """safetensors' own error type, raised inside atomic_output, becomes the one line."""
    out = tmp_path / "ckpt"
    r = _limited("import torch\nfrom safetensors.torch import save_file\n"
                 "from quantkit.util.atomic import atomic_output\nfrom quantkit.util.errors import QuantkitError\n"
                 "try:\n"
                 f"    with atomic_output({str(out)!r}, directory=True) as tmp:\n"
                 "        save_file({'w': torch.zeros(1 << 20)}, tmp + '/model.safetensors')\n"
                 "except QuantkitError as e:\n    print(e, file=sys.stderr); sys.exit(2)\n", 100_000)
    assert r.returncode == 2, r.stderr
    assert_one_line(r.stderr, str(out), "out of space")
    assert os.listdir(tmp_path) == []


def test_full_disk_writing_the_html_report(tmp_path):
    out = tmp_path / "report.html"
    row = {"name": "a.gguf", "path": "/m/a.gguf", "runtime": "llama.cpp", "is_reference": True, "file_bytes": 10**8,
           "n_params": 10**8, "bits_per_weight": 8.0, "bits_per_weight_linear": None, "ppl": 10.0, "ppl_stderr": 0.1,
           "kld_mean": 0.0, "kld_median": 0.0, "kld_p99": 0.0, "top1_agreement": 1.0, "delta_p_mean": 0.0,
           "n_scored": 100, "speed": {}}
    r = _limited("from quantkit.eval.results import EvalResult\nfrom quantkit.eval.report import write_report\n"
                 "from quantkit.util.errors import QuantkitError\n"
                 "try:\n"
                 f"    write_report(EvalResult([{row!r}], {{}}), {str(out)!r})\n"
                 "except QuantkitError as e:\n    print(e, file=sys.stderr); sys.exit(2)\n", 2000)
    assert r.returncode == 2, r.stderr
    assert_one_line(r.stderr, str(out), "out of space")
    assert os.listdir(tmp_path) == []
