"""Zero, negative, absurd, non-finite and wrongly typed values of every numeric flag, on every
command that takes it, and the same values from --config files: exit 2, one stderr line that
names the flag (or config key) and what is wrong, no traceback, nothing written.

Models and inputs named here do not exist: each value must be refused before anything is
opened, so a check that went missing shows up as a different error, not a long run."""

import pytest

from quantkit.cli import main
from helpers.cli import assert_one_line

LONG = "9" * 5000
Q = ["quantize", "missing-model", "-o", "out.gguf"]
E = ["eval", "missing.gguf", "--no-speed"]
D = ["distill", "finetune", "--train", "missing.tsv"]
K = ["distill", "kd", "--teacher", "missing-teacher", "--train", "missing.tsv"]


def _run(argv, capsys):
    """`quantkit ARGV`: its exit status (a usage error exits through argparse) and stderr."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


CASES = [
    # GPTQ knobs: the same refusal for every format GPTQ writes
    *[(Q + ["--format", fmt, "--damp", d], ["--damp", problem])
      for fmt in ("gguf:q4_0+gptq", "gptq:w4g128+gptq", "compressed-tensors:w4g128+gptq", "gguf:q4_0")
      for d, problem in (("-1", "out of range"), ("nan", "not a finite number"), ("inf", "not a finite number"),
                         ("2", "out of range"), ("abc", "not a number"))],
    (Q + ["--format", "gptq:w4g128+gptq", "--shrink", "1.5"], ["--shrink", "fraction from 0 to 1"]),
    (Q + ["--format", "gguf:q4_0+gptq", "--shrink", "-0.1"], ["--shrink", "out of range"]),
    # calibration, on every command that takes it
    *[(cmd + [flag, val], [flag, problem])
      for cmd in (Q + ["--format", "gguf:q4_0+gptq"], ["eval", "--ladder", "q4_0+gptq"], ["demo"])
      for flag, val, problem in (("--nsamples", "0", "out of range"), ("--nsamples", "-1", "out of range"),
                                 ("--nsamples", LONG, "too long for a number"), ("--nsamples", "1.5", "not an integer"),
                                 ("--seqlen", "1", "at least 2 tokens"), ("--seqlen", "1000000000", "out of range"))],
    # threads, on every command that takes them
    *[(cmd + ["--threads", t], ["--threads", problem])
      for cmd in (Q + ["--format", "gptq:w4g128+gptq"], E, ["demo"])
      for t, problem in (("0", "out of range"), ("-2", "out of range"), ("1e9", "not an integer"))],
    (Q + ["--format", "gptq", "--bits", "four"], ["--bits", "not an integer"]),
    (Q + ["--format", "gptq", "--group-size", LONG], ["--group-size", "too long for a number"]),
    (Q + ["--format", LONG[:500]], ["--format", "too long"]),
    (Q + ["--kernel", "k" * 100_000], ["--kernel", "invalid choice", "…"]),       # argparse's own message, cut
    (Q + ["--no-such-flag\nsecond line" + "x" * 5000], ["unrecognized arguments", "\\n"]),
    # eval
    (E + ["--chunks", "-1"], ["--chunks", "from 0 to"]),
    (E + ["--ctx", "0"], ["--ctx", "from 8 to"]),
    (E + ["--ctx", "4"], ["--ctx", "out of range"]),
    (E + ["--ctx", "99999999999"], ["--ctx", "out of range"]),
    (E + ["--speed-runs", "0"], ["--speed-runs", "out of range"]),
    (E + ["--speed-runs", "100000"], ["--speed-runs", "out of range"]),
    (E + ["--task-limit", "0"], ["--task-limit", "out of range"]),
    (E + ["--task-limit", "-5"], ["--task-limit", "out of range"]),
    (E + ["--cache-max", LONG + "G"], ["--cache-max", "too long"]),
    # demo
    (["demo", "--max-tokens", "0"], ["--max-tokens", "out of range"]),
    (["demo", "--max-tokens", "10000000"], ["--max-tokens", "out of range"]),
    (["demo", "--eval-chunks", "-1"], ["--eval-chunks", "out of range"]),
    (["demo", "--eval-ctx", "0"], ["--eval-ctx", "out of range"]),
    # inspect
    (["inspect", "missing.gguf", "--tensors", "-1"], ["--tensors", "out of range"]),
    (["inspect", "missing.gguf", "--tensors", "x"], ["--tensors", "not an integer"]),
    # plan: range checked when it runs (main returns 2), type when it parses
    (["plan", "llama-2-7b", "--ctx", "0"], ["--ctx", "out of range"]),
    (["plan", "llama-2-7b", "--ctx", "99999999999"], ["--ctx", "out of range"]),
    (["plan", "llama-2-7b", "--vram", "0"], ["--vram", "above 0"]),
    (["plan", "llama-2-7b", "--vram", "-1", "--bandwidth", "100"], ["--vram", "out of range"]),
    (["plan", "llama-2-7b", "--vram", "nan"], ["--vram", "not a finite number"]),
    (["plan", "llama-2-7b", "--vram", "12", "--bandwidth", "inf"], ["--bandwidth", "not a finite number"]),
    (["plan", "llama-2-7b", "--vram", "12", "--bandwidth", "0"], ["--bandwidth", "out of range"]),
    (["plan", "llama-2-7b", "--tflops", "-3"], ["--tflops", "out of range"]),
    (["plan", "llama-2-7b", "--ram", "1e12"], ["--ram", "out of range"]),
    (["plan", "llama-2-7b", "--batch", "0"], ["--batch", "out of range"]),
    (["plan", "llama-2-7b", "--rank", "0", "--train", "lora"], ["--rank", "out of range"]),
    (["plan", "llama-2-7b", "--batch", LONG], ["--batch", "too long for a number"]),
    # explain: numbers in a name
    (["explain", "9" * 400 + "b-q4_0"], ["name", "too long"]),
    (["explain", "9" * 44 + "b-q4_0"], ["size", "too long for a number"]),
    (["explain", "model-99999999999b-q4_0"], ["size", "out of range"]),
    (["explain", "model-7b-0g-gptq"], ["group size", "out of range"]),
    (["explain", "model-7b-9999999999bit"], ["bit width", "out of range"]),
    (["explain", "model-0b"], ["size", "is zero"]),
    # distill
    *[(D + [flag, val, "-o", "OUT"], [flag, problem]) for flag, val, problem in (
        ("--num-layers", "0", "out of range"), ("--num-layers", "99999", "out of range"),
        ("--batch-size", "0", "out of range"), ("--batch-size", "-4", "out of range"),
        ("--epochs", "0", "above 0"), ("--epochs", "nan", "not a finite number"),
        ("--lr", "-1", "above 0"), ("--head-lr", "0", "above 0"), ("--max-length", "0", "out of range"),
        ("--limit", "0", "out of range"), ("--dev-limit", "0", "out of range"), ("--seed", "-1", "out of range"),
        ("--save-every", "0", "out of range"), ("--max-steps", "0", "out of range"),
        ("--hidden", "0", "out of range"), ("--layers", "0,a", "not an integer"), ("--layers", ",", "names no layer"),
        ("--layers", "0,5000", "out of range"))],
    *[(K + [flag, val, "-o", "OUT"], [flag, problem]) for flag, val, problem in (
        ("--alpha", "2", "fraction from 0 to 1"), ("--temperature", "0", "above 0"),
        ("--p-unk", "1.5", "out of range"), ("--p-span", "-0.1", "out of range"),
        ("--augment", "-1", "out of range"), ("--relation-heads", "0", "out of range"),
        ("--relation-weight", "inf", "not a finite number"))],
]


@pytest.mark.parametrize("argv,needles", CASES, ids=lambda x: " ".join(x)[:70] if isinstance(x, list) else None)
def test_bad_flag_value_is_one_line(argv, needles, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = _run(argv, capsys)
    assert code == 2, err
    assert_one_line(err, *needles)
    assert len(err) < 1000, err
    assert list(tmp_path.iterdir()) == []


ALIAS_BOMB = "".join(f"{n}: &{n} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['x'] * 9)}]\n"
                     for p, n in zip([None, "a", "b", "c", "d", "e", "f", "g"], "abcdefgh")) + "nsamples: *h\n"

CONFIG_CASES = [
    ("quantize", "nsamples: .inf\n", ["option 'nsamples'", "not a whole number"]),
    ("quantize", "nsamples: 1.5\n", ["option 'nsamples'", "not a whole number"]),
    ("quantize", "nsamples: true\n", ["option 'nsamples'", "not an integer"]),
    ("quantize", "seqlen: [64]\n", ["option 'seqlen'", "is a list, not an integer"]),
    ("quantize", "nsamples: 0\n", ["option 'nsamples'", "at least 1 sample"]),
    ("eval", "seqlen: 1\nladder: true\n", ["option 'seqlen'", "at least 2 tokens"]),
    ("quantize", "damp: -1\n", ["option 'damp'", "out of range"]),
    ("quantize", "damp: .nan\n", ["option 'damp'", "not a finite number"]),
    ("quantize", "damp: '0.1'\nshrink: 3\n", ["option 'shrink'", "fraction from 0 to 1"]),
    ("quantize", "calib: 5\n", ["option 'calib'", "is an integer, not a string"]),
    ("quantize", "format: [gguf, q4_0]\n", ["option 'format'", "is a list, not a string"]),
    ("quantize", "format: 4\n", ["option 'format'", "is an integer, not a string"]),
    ("quantize", "output: 7\n", ["option 'output'", "is an integer, not a string"]),
    ("quantize", "model: {a: 1}\n", ["option 'model'", "is a mapping, not a string"]),
    ("quantize", "threads: 0\nformat: gptq\n", ["option 'threads'", "out of range"]),
    ("quantize", "method: [rtn]\n", ["option 'method'", "not a string"]),
    ("quantize", "pure: 1\n", ["option 'pure'", "true or false"]),
    ("quantize", "colour: blue\n", ["unknown option 'colour'", "valid keys"]),
    ("quantize", "1: x\n", ["option name 1", "not text"]),
    ("quantize", f"calib: {'c' * 10000}\n", ["option 'calib'", "too long"]),
    ("quantize", ALIAS_BOMB, ["expands to more than 10,000 values", "aliases"]),
    ("quantize", "a: " + "[" * 5000 + "]" * 5000 + "\n", ["not valid YAML/JSON"]),
    ("quantize", '{"nsamples": 1e999}', ["option 'nsamples'", "not an integer"]),     # YAML 1.1: a string
    ("quantize", '{"damp": 1.0e999}', ["option 'damp'", "not a finite number"]),
    ("eval", "ctx: 0\n", ["option 'ctx'", "out of range"]),
    ("eval", "models: 3\n", ["option 'models'", "is an integer, not a string"]),
    ("eval", "models: [a.gguf, [b]]\n", ["option 'models'", "is a list, not a string"]),
    ("eval", "speed_runs: .inf\n", ["option 'speed_runs'", "not a whole number"]),
    ("eval", "task_limit: -1\n", ["option 'task_limit'", "out of range"]),
    ("demo", "max_tokens: 0\n", ["option 'max_tokens'", "out of range"]),
    ("demo", "eval_ctx: 1e3\n", ["option 'eval_ctx'", "not an integer"]),
]


@pytest.mark.parametrize("command,body,needles", CONFIG_CASES, ids=lambda x: x[:40] if isinstance(x, str) else None)
def test_bad_config_value_is_one_line(command, body, needles, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(body, encoding="utf-8")
    argv = [command, "--config", str(cfg)] + (["-o", "OUT"] if command == "quantize" and "output" not in body else [])
    code, err = _run(argv, capsys)
    assert code == 2, err
    assert_one_line(err, str(cfg), *needles)
    assert len(err) < 1000, err
    assert [p.name for p in tmp_path.iterdir()] == ["c.yaml"]


def test_typed_config_values_are_read_as_their_flags(tmp_path, capsys):
    """JSON numbers, whole floats and numerals in quotes give the values the flags give."""
    from quantkit.cli import build_parser
    from quantkit.commands import options
    cfg = tmp_path / "c.json"
    cfg.write_text('{"nsamples": 8.0, "seqlen": "64", "damp": 0.02, "format": "gptq:w4g32+gptq", "threads": 2}')
    args = build_parser().parse_args(["quantize", "--config", str(cfg), "-o", "x"])
    options.apply_config(args)
    r = options.recipe_from_args(args)
    assert (r.calibration.nsamples, r.calibration.seqlen, r.gptq.damp, args.threads) == (8, 64, 0.02, 2)
    assert type(r.calibration.nsamples) is int
    cfg.write_text('{"models": "a.gguf", "ctx": 256, "ladder": true}')
    args = build_parser().parse_args(["eval", "--config", str(cfg)])
    options.apply_config(args)
    assert args.models == ["a.gguf"] and args.ctx == 256 and args.ladder == "default"
