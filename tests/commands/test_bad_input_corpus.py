"""The bad-input corpus: what a careless or hostile user gives every command.

Each case is one command line built over a shared set of damaged, odd or dangerous inputs
(missing, empty, truncated, wrong-kind and non-UTF-8 files, directories where files belong,
FIFOs, device nodes and sockets, pickles without --trust-pickle, NaN weights, outputs that are
the input or cannot be written). Every case asserts the exit code, exactly one stderr line that
names the file or flag and the problem, no traceback, and nothing left behind: neither in the
case's output folder nor among the inputs, which are unchanged (a device node still a device
node, an input never overwritten).
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.cli import assert_one_line, interrupt_mid_run, run_cli
from helpers.tiny_models import write_minimal_llama_gguf


# ---- the inputs, built once ------------------------------------------------------------------
def _tiny_gguf(path: Path, nan: bool = False) -> str:
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    bad = w.copy()
    if nan:
        bad[3, 5] = np.nan
        bad[7, 1] = np.inf
    return write_minimal_llama_gguf(path, {"blk.0.attn_q.weight": w, "blk.0.attn_k.weight": bad})


def _with_nan(src: Path, dst: Path, weights: str, tensor: str) -> None:
    """A copy of the model directory SRC whose tensor TENSOR (in file WEIGHTS) holds one NaN."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    sd = load_file(str(src / weights))
    sd[tensor] = sd[tensor].clone()
    sd[tensor][0, 0] = float("nan")
    save_file(sd, str(dst / weights), metadata={"format": "pt"})


def _pickled(src: Path, dst: Path) -> None:
    """The model directory SRC with its weights as pytorch_model.bin (a pickle) instead of safetensors."""
    from safetensors.torch import load_file
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors*"))
    torch.save(load_file(str(src / "model.safetensors")), str(dst / "pytorch_model.bin"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, gptq_llama_dir):
    from helpers.encoders import save_tiny_bert

    d = tmp_path_factory.mktemp("corpus-inputs")
    _tiny_gguf(d / "tiny.gguf")
    _tiny_gguf(d / "nan.gguf", nan=True)
    raw = (d / "tiny.gguf").read_bytes()
    (d / "cut.gguf").write_bytes(raw[:100])
    (d / "empty.gguf").write_bytes(b"")
    (d / "text.gguf").write_bytes(b"this is not a model\n" * 50)
    (d / "nonutf8.gguf").write_bytes(b"\xff\xfe\x00\x80" * 64)
    (d / "dir.gguf").mkdir()
    (d / "loop.gguf").symlink_to(d / "loop.gguf")
    (d / "lone.safetensors").write_bytes((gptq_llama_dir / "model.safetensors").read_bytes()[:4096])

    shutil.copytree(gptq_llama_dir, d / "hf")
    _with_nan(gptq_llama_dir, d / "hf_nan", "model.safetensors", "model.layers.0.self_attn.k_proj.weight")
    _pickled(gptq_llama_dir, d / "hf_pickle")
    for name, cfg in (("hf_badjson", b"{bad json"), ("hf_nonutf8", b'{"a": "\xff\xfe"}'), ("hf_list", b"[1, 2]")):
        shutil.copytree(gptq_llama_dir, d / name)
        (d / name / "config.json").write_bytes(cfg)
    (d / "hf_noweights").mkdir()
    shutil.copy(gptq_llama_dir / "config.json", d / "hf_noweights" / "config.json")
    (d / "noconfig").mkdir()
    (d / "noconfig" / "model.safetensors").write_bytes(b"")

    save_tiny_bert(d / "bert", labels=["0", "1"])
    _with_nan(d / "bert", d / "bert_nan", "model.safetensors", "encoder.layer.0.attention.self.query.weight")

    from quantkit.util.data import DATA_DIR
    lines = (Path(DATA_DIR) / "wikitext-2" / "valid.txt").read_text(encoding="utf-8").splitlines()
    (d / "small.txt").write_text("\n".join(lines[:400]), encoding="utf-8")
    (d / "empty.txt").write_text("")
    (d / "nonutf8.txt").write_bytes(b"caf\xe9 \xff\xfe text in latin-1 and worse\n" * 50)
    sst = (Path(DATA_DIR) / "sst2" / "dev.tsv").read_text(encoding="utf-8").splitlines()
    (d / "train.tsv").write_text("\n".join(sst[:40]) + "\n", encoding="utf-8")
    (d / "notab.tsv").write_text("no tab here\njust words\n", encoding="utf-8")
    (d / "nonutf8.tsv").write_bytes(b"1\tcaf\xe9 \xff\n0\tbad \xfe bytes\n" * 10)

    (d / "garbage.yaml").write_text("{{{: : :\n  - [\n", encoding="utf-8")
    (d / "list.yaml").write_text("- a\n- b\n", encoding="utf-8")
    (d / "nonutf8.yaml").write_bytes(b"format: \xff\xfe\n")
    (d / "unknown_key.yaml").write_text("frobnicate: 3\n", encoding="utf-8")
    (d / "pickle_opt_in.yaml").write_text("trust_pickle: true\n", encoding="utf-8")
    (d / "int_format.yaml").write_text("format: 4\n", encoding="utf-8")

    os.mkfifo(d / "fifo")
    os.mknod(d / "zero", 0o666 | stat.S_IFCHR, os.makedev(1, 5))    # what /dev/zero is (as root)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(d / "sock"))
    sock.close()
    (d / "afile").write_text("x")
    return d


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ROOT: its kind, size and mtime (links not followed)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (stat.S_IFMT(st.st_mode), st.st_size if stat.S_ISREG(st.st_mode) else 0,
                                            st.st_mtime_ns if stat.S_ISREG(st.st_mode) else 0)
    return out


# ---- the cases -------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    argv: list[str]         # {in} is the inputs folder, {out} the case's own output folder
    needles: tuple          # what the one stderr line must say ({in}/{out} filled in too)
    code: int = 2
    chdir: str | None = None     # run from this folder ({in} / {out})


C = Case
CASES = [
    # -- inspect: files that are not models
    C("inspect-missing", ["inspect", "{in}/nope.gguf"], ("{in}/nope.gguf", "no such file")),
    C("inspect-empty", ["inspect", "{in}/empty.gguf"], ("{in}/empty.gguf",)),
    C("inspect-truncated", ["inspect", "{in}/cut.gguf"], ("{in}/cut.gguf", "truncated")),
    C("inspect-text", ["inspect", "{in}/text.gguf"], ("{in}/text.gguf", "not a model")),
    C("inspect-non-utf8-bytes", ["inspect", "{in}/nonutf8.gguf"], ("{in}/nonutf8.gguf", "not a model")),
    C("inspect-dir-named-gguf", ["inspect", "{in}/dir.gguf"], ("{in}/dir.gguf", "config.json")),
    C("inspect-symlink-loop", ["inspect", "{in}/loop.gguf"], ("{in}/loop.gguf", "no such")),
    C("inspect-lone-safetensors", ["inspect", "{in}/lone.safetensors"], ("{in}/lone.safetensors", "config")),
    C("inspect-fifo", ["inspect", "{in}/fifo"], ("{in}/fifo", "MODEL", "FIFO")),
    C("inspect-device", ["inspect", "{in}/zero"], ("{in}/zero", "MODEL", "device")),
    C("inspect-socket", ["inspect", "{in}/sock"], ("{in}/sock", "MODEL", "socket")),
    C("inspect-no-config", ["inspect", "{in}/noconfig"], ("{in}/noconfig", "config.json")),
    C("inspect-config-not-json", ["inspect", "{in}/hf_badjson"], ("{in}/hf_badjson/config.json",)),
    C("inspect-config-non-utf8", ["inspect", "{in}/hf_nonutf8"], ("{in}/hf_nonutf8/config.json",)),
    C("inspect-config-a-list", ["inspect", "{in}/hf_list"], ("{in}/hf_list/config.json", "not a JSON object")),
    C("inspect-no-weights", ["inspect", "{in}/hf_noweights"], ("{in}/hf_noweights", "no weights")),
    C("inspect-pickle", ["inspect", "{in}/hf_pickle"], ("{in}/hf_pickle/pytorch_model.bin", "pickle",
                                                        "--trust-pickle", "safetensors")),
    # -- quantize to GGUF: outputs that must not be written
    C("gguf-o-is-input", ["quantize", "{in}/tiny.gguf", "--format", "gguf:q8_0", "-o", "{in}/tiny.gguf"],
      ("{in}/tiny.gguf", "-o is the input")),
    C("gguf-o-dot-spelling", ["quantize", "tiny.gguf", "--format", "gguf:q8_0", "-o", "./tiny.gguf"],
      ("tiny.gguf", "-o is the input"), chdir="{in}"),
    C("gguf-o-fifo", ["quantize", "{in}/tiny.gguf", "--format", "gguf:q8_0", "-o", "{in}/fifo"],
      ("{in}/fifo", "FIFO", "not a regular file")),
    C("gguf-o-device", ["quantize", "{in}/tiny.gguf", "--format", "gguf:q8_0", "-o", "{in}/zero"],
      ("{in}/zero", "character device")),
    C("gguf-o-socket", ["quantize", "{in}/tiny.gguf", "--format", "gguf:q8_0", "-o", "{in}/sock"],
      ("{in}/sock", "socket")),
    C("gguf-o-directory", ["quantize", "{in}/tiny.gguf", "--format", "gguf:q8_0", "-o", "{out}"],
      ("{out}", "existing directory")),
    C("gguf-o-missing-dir", ["quantize", "{in}/tiny.gguf", "--format", "gguf:q8_0", "-o", "{out}/no/o.gguf"],
      ("{out}/no", "does not exist")),
    C("gguf-o-under-a-file", ["quantize", "{in}/tiny.gguf", "--format", "gguf:q8_0", "-o", "{in}/afile/o.gguf"],
      ("{in}/afile", "not a directory")),
    C("gguf-o-over-model-file", ["quantize", "{in}/hf", "--format", "gguf:q8_0", "-o", "{in}/hf/config.json"],
      ("{in}/hf/config.json", "input model directory")),
    C("gguf-o-is-calib", ["quantize", "{in}/hf", "--format", "gguf:q4_0+gptq", "--calib", "{in}/small.txt",
                          "-o", "{in}/small.txt"], ("{in}/small.txt", "-o is the input")),
    C("gguf-nan", ["quantize", "{in}/nan.gguf", "--format", "gguf:q4_0", "-o", "{out}/o.gguf"],
      ("{in}/nan.gguf", "blk.0.attn_k.weight", "2 NaN/Inf")),
    C("gguf-hf-nan", ["quantize", "{in}/hf_nan", "--format", "gguf:q8_0", "-o", "{out}/o.gguf"],
      ("{in}/hf_nan", "blk.0.attn_k.weight", "NaN/Inf")),
    C("gguf-gptq-hf-nan", ["quantize", "{in}/hf_nan", "--format", "gguf:q4_0+gptq", "--calib", "{in}/small.txt",
                           "--nsamples", "2", "--seqlen", "32", "-o", "{out}/o.gguf"],
      ("{in}/hf_nan", "k_proj.weight", "NaN/Inf")),
    C("gguf-pickle", ["quantize", "{in}/hf_pickle", "--format", "gguf:q8_0", "-o", "{out}/o.gguf"],
      ("{in}/hf_pickle/pytorch_model.bin", "--trust-pickle")),
    C("gguf-model-missing", ["quantize", "{in}/nope", "-o", "{out}/o.gguf"], ("{in}/nope", "no such")),
    C("gguf-model-fifo", ["quantize", "{in}/fifo", "-o", "{out}/o.gguf"], ("{in}/fifo", "FIFO")),
    C("gguf-unknown-type", ["quantize", "{in}/tiny.gguf", "--format", "gguf:q3_0", "-o", "{out}/o.gguf"],
      ("q3_0", "q4_0")),
    C("gguf-unknown-format", ["quantize", "{in}/tiny.gguf", "--format", "onnx", "-o", "{out}/o.gguf"], ("onnx",)),
    C("gguf-no-output", ["quantize", "{in}/tiny.gguf", "--format", "gguf:q8_0"], ("no output", "-o")),
    C("gguf-calib-missing", ["quantize", "{in}/hf", "--format", "gguf:q4_0+gptq", "--calib", "{in}/nope.txt",
                             "-o", "{out}/o.gguf"], ("{in}/nope.txt",)),
    C("gguf-calib-empty", ["quantize", "{in}/hf", "--format", "gguf:q4_0+gptq", "--calib", "{in}/empty.txt",
                           "-o", "{out}/o.gguf"], ("{in}/empty.txt",)),
    C("gguf-calib-directory", ["quantize", "{in}/hf", "--format", "gguf:q4_0+gptq", "--calib", "{in}/dir.gguf",
                               "-o", "{out}/o.gguf"], ("{in}/dir.gguf",)),
    C("gguf-calib-fifo", ["quantize", "{in}/hf", "--format", "gguf:q4_0+gptq", "--calib", "{in}/fifo",
                          "-o", "{out}/o.gguf"], ("{in}/fifo", "--calib", "FIFO")),
    C("gguf-nsamples-zero", ["quantize", "{in}/hf", "--format", "gguf:q4_0+gptq", "--nsamples", "0",
                             "-o", "{out}/o.gguf"], ("sample",)),
    # -- --config files
    C("config-missing", ["quantize", "--config", "{in}/nope.yaml", "-o", "{out}/o.gguf"], ("{in}/nope.yaml", "no such")),
    C("config-garbage", ["quantize", "--config", "{in}/garbage.yaml", "-o", "{out}/o.gguf"],
      ("{in}/garbage.yaml", "not valid YAML")),
    C("config-non-utf8", ["quantize", "--config", "{in}/nonutf8.yaml", "-o", "{out}/o.gguf"],
      ("{in}/nonutf8.yaml", "not valid YAML")),
    C("config-a-list", ["quantize", "--config", "{in}/list.yaml", "-o", "{out}/o.gguf"], ("{in}/list.yaml", "mapping")),
    C("config-unknown-key", ["quantize", "--config", "{in}/unknown_key.yaml", "-o", "{out}/o.gguf"],
      ("{in}/unknown_key.yaml", "frobnicate")),
    C("config-cannot-trust-pickle", ["quantize", "{in}/hf_pickle", "--config", "{in}/pickle_opt_in.yaml",
                                     "-o", "{out}/o.gguf"], ("{in}/pickle_opt_in.yaml", "trust_pickle")),
    C("config-format-an-int", ["quantize", "{in}/tiny.gguf", "--config", "{in}/int_format.yaml", "-o", "{out}/o.gguf"],
      ("int_format.yaml", "option 'format'", "not a string")),
    C("config-fifo", ["quantize", "--config", "{in}/fifo", "-o", "{out}/o.gguf"], ("{in}/fifo", "--config", "FIFO")),
    C("config-is-a-directory", ["quantize", "--config", "{in}/dir.gguf", "-o", "{out}/o.gguf"], ("{in}/dir.gguf",)),
    # -- quantize to GPU checkpoints (directories)
    C("gpu-o-is-input", ["quantize", "{in}/hf", "--format", "gptq:w4g128+rtn", "-o", "{in}/hf"],
      ("{in}/hf", "-o is the input")),
    C("gpu-o-inside-input", ["quantize", "{in}/hf", "--format", "gptq:w4g128+rtn", "-o", "{in}/hf/gptq"],
      ("{in}/hf/gptq", "lies inside the input")),
    C("gpu-o-holds-input", ["quantize", "{in}/hf", "--format", "gptq:w4g128+rtn", "-o", "{in}"],
      ("{in}", "holds the input")),
    C("gpu-o-a-file", ["quantize", "{in}/hf", "--format", "compressed-tensors:w4g128+rtn", "-o", "{in}/afile"],
      ("{in}/afile", "existing file")),
    C("gpu-o-fifo", ["quantize", "{in}/hf", "--format", "compressed-tensors:w4g128+rtn", "-o", "{in}/fifo"],
      ("{in}/fifo", "FIFO")),
    C("gpu-nan-rtn", ["quantize", "{in}/hf_nan", "--format", "gptq:w4g128+rtn", "-o", "{out}/q"],
      ("k_proj.weight", "NaN/Inf")),
    C("gpu-nan-gptq", ["quantize", "{in}/hf_nan", "--format", "compressed-tensors:w4g128+gptq", "--calib",
                       "{in}/small.txt", "--nsamples", "2", "--seqlen", "32", "-o", "{out}/q"],
      ("k_proj.weight", "NaN/Inf")),
    C("gpu-damp-negative", ["quantize", "{in}/hf", "--format", "gptq:w4g128", "--damp", "-1", "-o", "{out}/q"],
      ("--damp", "-1")),
    C("gpu-pickle", ["quantize", "{in}/hf_pickle", "--format", "gptq:w4g128+rtn", "-o", "{out}/q"],
      ("{in}/hf_pickle/pytorch_model.bin", "--trust-pickle")),
    C("gpu-calib-non-utf8", ["quantize", "{in}/hf", "--format", "gptq:w4g128+gptq", "--calib", "{in}/nonutf8.txt",
                             "--nsamples", "2", "--seqlen", "32", "-o", "{out}/q"], ("{in}/nonutf8.txt",)),
    # -- dynamic int8 encoders
    C("int8-nan", ["quantize", "{in}/bert_nan", "--format", "int8", "-o", "{out}/q"],
      ("{in}/bert_nan", "encoder.layer.0.attention.self.query.weight", "1 NaN/Inf")),
    C("int8-o-is-input", ["quantize", "{in}/bert", "--format", "int8", "-o", "{in}/bert"], ("{in}/bert", "is the input")),
    C("int8-o-inside-input", ["quantize", "{in}/bert", "--format", "int8", "-o", "{in}/bert/int8"],
      ("{in}/bert/int8", "lies inside")),
    C("int8-o-device", ["quantize", "{in}/bert", "--format", "int8", "-o", "{in}/zero"], ("{in}/zero", "device")),
    C("int8-model-missing", ["quantize", "{in}/nope", "--format", "int8", "-o", "{out}/q"], ("{in}/nope",)),
    C("int8-model-is-llm", ["quantize", "{in}/hf", "--format", "int8", "-o", "{out}/q"], ("{in}/hf",)),
    C("int8-model-a-file", ["quantize", "{in}/small.txt", "--format", "int8", "-o", "{out}/q"], ("{in}/small.txt",)),
    # -- eval
    C("eval-missing", ["eval", "{in}/nope.gguf", "--no-speed"], ("{in}/nope.gguf",)),
    C("eval-truncated", ["eval", "{in}/cut.gguf", "--no-speed"], ("{in}/cut.gguf",)),
    C("eval-text-missing", ["eval", "{in}/tiny.gguf", "--text", "{in}/nope.txt", "--no-speed"], ("{in}/nope.txt",)),
    C("eval-text-fifo", ["eval", "{in}/tiny.gguf", "--text", "{in}/fifo", "--no-speed"], ("{in}/fifo", "--text")),
    C("eval-report-is-model", ["eval", "{in}/tiny.gguf", "--report", "{in}/tiny.gguf", "--no-speed"],
      ("{in}/tiny.gguf", "--report is the input")),
    C("eval-report-is-text", ["eval", "{in}/hf", "--text", "{in}/small.txt", "--report", "{in}/small.txt"],
      ("{in}/small.txt", "--report is the input")),
    C("eval-report-fifo", ["eval", "{in}/tiny.gguf", "--report", "{in}/fifo", "--no-speed"], ("{in}/fifo", "FIFO")),
    C("eval-report-device", ["eval", "{in}/tiny.gguf", "--report", "{in}/zero", "--no-speed"],
      ("{in}/zero", "character device")),
    C("eval-report-a-directory", ["eval", "{in}/tiny.gguf", "--report", "{out}", "--no-speed"], ("{out}", "directory")),
    C("eval-report-missing-dir", ["eval", "{in}/tiny.gguf", "--report", "{out}/no/r.html", "--no-speed"],
      ("{out}/no", "does not exist")),
    C("eval-pickle", ["eval", "{in}/hf_pickle", "--no-speed", "--no-cache"], ("{in}/hf_pickle/pytorch_model.bin",
                                                                              "--trust-pickle")),
    C("eval-nan-logits", ["eval", "{in}/hf_nan", "--text", "{in}/small.txt", "--chunks", "1", "--ctx", "64",
                          "--no-speed", "--no-cache"], ("{in}/hf_nan", "NaN/Inf", "logits")),
    C("eval-nan-classifier", ["eval", "{in}/bert_nan", "--task-limit", "20", "--no-speed"],
      ("{in}/bert_nan", "NaN/Inf", "logits")),
    C("eval-ladder-dir-a-file", ["eval", "--ladder", "q8_0", "--ladder-dir", "{in}/afile", "--no-speed"],
      ("{in}/afile", "existing file")),
    C("eval-negative-chunks", ["eval", "{in}/tiny.gguf", "--chunks", "-1", "--no-speed"], ("--chunks",)),
    # -- demo
    C("demo-out-dir-a-file", ["demo", "--out-dir", "{in}/afile"], ("{in}/afile", "existing file")),
    C("demo-out-dir-fifo", ["demo", "--out-dir", "{in}/fifo"], ("{in}/fifo", "FIFO")),
    C("demo-unknown-rung", ["demo", "--types", "q9_9", "--out-dir", "{out}/d"], ("q9_9",)),
    C("demo-zero-tokens", ["demo", "--max-tokens", "0", "--out-dir", "{out}/d"], ("--max-tokens",)),
    # -- plan and explain
    C("plan-missing", ["plan", "{in}/nope.gguf"], ("nope.gguf",)),
    C("plan-truncated", ["plan", "{in}/cut.gguf"], ("{in}/cut.gguf",)),
    C("plan-empty", ["plan", "{in}/empty.gguf"], ("{in}/empty.gguf",)),
    C("plan-fifo", ["plan", "{in}/fifo"], ("{in}/fifo", "FIFO")),
    C("plan-config-not-json", ["plan", "{in}/hf_badjson"], ("{in}/hf_badjson",)),
    C("plan-unknown-device", ["plan", "{in}/tiny.gguf", "--device", "gtx-9999"], ("gtx-9999",)),
    C("explain-empty", ["explain", ""], ("empty model name",)),
    # -- distill
    C("distill-no-objective", ["distill"], ("objective",)),
    C("distill-train-missing", ["distill", "finetune", "--model", "{in}/bert", "--train", "{in}/nope.tsv",
                                "-o", "{out}/s"], ("{in}/nope.tsv",)),
    C("distill-train-empty", ["distill", "finetune", "--model", "{in}/bert", "--train", "{in}/empty.txt",
                              "-o", "{out}/s"], ("{in}/empty.txt",)),
    C("distill-train-no-tabs", ["distill", "finetune", "--model", "{in}/bert", "--train", "{in}/notab.tsv",
                                "-o", "{out}/s"], ("{in}/notab.tsv",)),
    C("distill-train-non-utf8", ["distill", "finetune", "--model", "{in}/bert", "--train", "{in}/nonutf8.tsv",
                                 "-o", "{out}/s"], ("{in}/nonutf8.tsv",)),
    C("distill-train-directory", ["distill", "finetune", "--model", "{in}/bert", "--train", "{in}/dir.gguf",
                                  "-o", "{out}/s"], ("{in}/dir.gguf",)),
    C("distill-train-fifo", ["distill", "finetune", "--model", "{in}/bert", "--train", "{in}/fifo",
                             "-o", "{out}/s"], ("{in}/fifo", "--train", "FIFO")),
    C("distill-o-is-model", ["distill", "finetune", "--model", "{in}/bert", "--train", "{in}/train.tsv",
                             "-o", "{in}/bert"], ("{in}/bert", "-o is the input")),
    C("distill-o-holds-train", ["distill", "finetune", "--model", "{in}/bert", "--train", "{in}/train.tsv",
                                "-o", "{in}"], ("{in}", "holds the input")),
    C("distill-o-device", ["distill", "finetune", "--model", "{in}/bert", "--train", "{in}/train.tsv",
                           "-o", "{in}/zero"], ("{in}/zero", "device")),
    C("distill-checkpoint-is-model", ["distill", "finetune", "--model", "{in}/bert", "--train", "{in}/train.tsv",
                                      "-o", "{out}/s", "--checkpoint-dir", "{in}/bert"],
      ("{in}/bert", "--checkpoint-dir is the input")),
    C("distill-o-missing-dir", ["distill", "finetune", "--model", "{in}/bert", "--train", "{in}/train.tsv",
                                "-o", "{out}/no/s"], ("{out}/no", "does not exist")),
    C("distill-kd-teacher-missing", ["distill", "kd", "--teacher", "{in}/nope", "--train", "{in}/train.tsv",
                                     "-o", "{out}/s"], ("{in}/nope",)),
    C("distill-model-is-llm", ["distill", "finetune", "--model", "{in}/hf", "--train", "{in}/train.tsv",
                               "-o", "{out}/s"], ("{in}/hf",)),
    # -- the command line itself
    C("unknown-command", ["frobnicate"], ("invalid choice", "frobnicate")),
    C("bits-not-a-choice", ["quantize", "--bits", "7", "-o", "{out}/o"], ("--bits", "7")),
]


def _fill(s: str, inp: Path, out: Path) -> str:
    return s.replace("{in}", str(inp)).replace("{out}", str(out))


def test_the_corpus_is_large_and_covers_every_command():
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)
    commands = {c.argv[0] for c in CASES}
    assert {"inspect", "quantize", "eval", "demo", "plan", "explain", "distill"} <= commands
    formats = " ".join(" ".join(c.argv) for c in CASES if c.argv[0] == "quantize")
    for f in ("gguf:q8_0", "+gptq", "gptq:", "compressed-tensors:", "int8"):
        assert f in formats


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, inputs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    argv = [_fill(a, inputs, out) for a in case.argv]
    needles = [_fill(n, inputs, out) for n in case.needles]
    if case.chdir:
        monkeypatch.chdir(_fill(case.chdir, inputs, out))
    before = _snapshot(inputs)
    try:
        code, err = run_cli(argv, capsys)
    except SystemExit as e:                 # argparse's own usage errors
        code, err = e.code, capsys.readouterr().err
    assert code == case.code, err
    assert_one_line(err, *needles)
    assert _snapshot(inputs) == before, "an input was changed, or something was left among the inputs"
    assert os.listdir(out) == [], "something was left in the output folder"


# ---- what is not a single run: pickles read when asked, a second Ctrl-C ----------------------
@pytest.mark.usefixtures("one_thread")
def test_trust_pickle_reads_the_same_model(inputs, tmp_path, capsys):
    """With --trust-pickle (API: trust_pickle=True) the pickled directory is read, and its GGUF is
    byte for byte the safetensors directory's."""
    from quantkit import api
    code, err = run_cli(["quantize", str(inputs / "hf_pickle"), "--format", "gguf:q8_0", "--trust-pickle",
                         "-o", str(tmp_path / "p.gguf")], capsys)
    assert code == 0, err
    shutil.copytree(inputs / "hf", tmp_path / "hf_pickle")      # the same name: general.name is the folder's
    api.quantize(str(tmp_path / "hf_pickle"), tmp_path / "s.gguf", format="gguf:q8_0", show_progress=False)
    assert (tmp_path / "p.gguf").read_bytes() == (tmp_path / "s.gguf").read_bytes()
    assert api.inspect(str(inputs / "hf_pickle"), trust_pickle=True)["parameters"] > 0
    from quantkit.util.errors import QuantkitError
    with pytest.raises(QuantkitError, match="trust_pickle=True"):
        api.inspect(str(inputs / "hf_pickle"))


def test_second_ctrl_c_during_cleanup_is_quiet(bundled_gguf, tmp_path):
    """Ctrl-C pressed again and again while the first one unwinds: still exit 130, the one
    "interrupted" line, no traceback from any exit handler, nothing left."""
    interrupt_mid_run(["quantize", bundled_gguf, "--format", "gguf:q4_0", "-o", str(tmp_path / "o.gguf")],
                      tmp_path, signals=20)


def test_full_disk_writing_an_int8_encoder(inputs, tmp_path):
    """safetensors raises its own SafetensorError when the disk fills: one line, nothing left."""
    r = _limited(["quantize", str(inputs / "bert"), "--format", "int8", "-o", str(tmp_path / "q")], 200_000)
    assert r.returncode == 2, r.stderr
    assert_one_line(r.stderr, str(tmp_path / "q"), "out of space")
    assert os.listdir(tmp_path) == []


def test_full_disk_writing_a_distillation(inputs, tmp_path):
    out = tmp_path / "s"
    r = _limited(["distill", "finetune", "--model", str(inputs / "bert"), "--train", str(inputs / "train.tsv"),
                  "--max-steps", "1", "--batch-size", "4", "-o", str(out)], 200_000)
    assert r.returncode == 2, r.stderr
    assert_one_line(r.stderr, "out of space")
    assert os.listdir(tmp_path) == []


@pytest.mark.usefixtures("one_thread")
def test_full_disk_writing_the_eval_cache(inputs, tmp_path):
    """The reference's log-probabilities go to a cache file (memory-mapped, its blocks reserved
    first): a full disk there is the one line too, and no partial cache file is left."""
    cache = tmp_path / "cache"
    r = _limited(["eval", str(inputs / "hf"), "--text", str(inputs / "small.txt"), "--chunks", "1", "--ctx", "64",
                  "--no-speed"], 60_000, QUANTKIT_CACHE=str(cache))
    assert r.returncode == 2, r.stderr
    assert_one_line(r.stderr, str(cache), "out of space")
    left = [os.path.join(d, n) for d, _, names in os.walk(cache) for n in names]
    assert not [p for p in left if "partial" in p or p.endswith(".npy")], left


def _limited(args: list[str], limit: int, **env) -> subprocess.CompletedProcess:
    pre = ("import resource, signal, sys\n"
           "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
           f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
           f"from quantkit.cli import main\nsys.exit(main({args!r}))\n")
    return subprocess.run([sys.executable, "-c", pre], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1", **env})
