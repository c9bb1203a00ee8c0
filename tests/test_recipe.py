"""One recipe grammar (quantkit.recipe): every spelling round-trips, old spellings map with a
note, bad strings name the wrong part, flags and config files give the same Recipe, and every
command that prints a table can print JSON instead."""

from __future__ import annotations

import json

import pytest

from quantkit import recipe as rc
from quantkit.cli import build_parser, main
from quantkit.commands import options
from quantkit.recipe import Calibration, GPTQKnobs, Recipe, from_dict, from_flags, parse_recipe
from quantkit.util.errors import QuantkitError


def _every_recipe():
    for t in rc.GGUF_FILE_TYPES:
        yield Recipe("gguf", t, "rtn")
        if t not in rc.FLOAT_TYPES:
            yield Recipe("gguf", t, "gptq")
    for fmt in rc.GPU_FORMATS:
        for bits in rc.FORMAT_BITS[fmt]:
            for g in rc.GROUP_SIZES:
                for sym in (True, False):
                    for m in rc.METHODS:
                        yield Recipe(fmt, None, m, bits, g, sym)
    yield Recipe("int8", None, "dynamic-int8")


def test_every_recipe_round_trips(capsys):
    n = 0
    for r in _every_recipe():
        s = r.spelling()
        assert parse_recipe(s) == r, s
        assert parse_recipe(s).spelling() == s
        assert parse_recipe(r.spelling(short=True)) == r
        assert from_dict(r.to_dict()) == r
        n += 1
    assert n == 32 + 29 + 5 * 2 * 2 * (4 + 6) + 1     # gguf rtn, gguf gptq, GPU formats, int8
    assert capsys.readouterr().err == ""           # canonical spellings: no notes


def test_spellings_read_as_documented():
    assert parse_recipe("q4_0") == parse_recipe("gguf:q4_0") == parse_recipe("GGUF:Q4_0+rtn") == Recipe()
    r = parse_recipe("gguf:q3_k_m+gptq")
    assert (r.format, r.type, r.method, r.shrink) == ("gguf", "q3_k_m", "gptq", 0.1)
    r = parse_recipe("compressed-tensors:w3g32-asym+gptq")
    assert (r.format, r.bits, r.group_size, r.sym, r.method, r.shrink) == ("compressed-tensors", 3, 32, False,
                                                                           "gptq", 0.0)
    assert parse_recipe("gptq").spelling() == "gptq:w4g128"           # the format alone: 4-bit, group 128, RTN
    assert parse_recipe("gptq:w8").spelling() == "gptq:w8g128"
    assert parse_recipe("gptq:w8g-1").group_size == -1
    assert parse_recipe("int8").method == "dynamic-int8"
    assert Recipe("gptq", bits=3) == parse_recipe("gptq:w3g128")        # typed construction, defaults filled
    assert parse_recipe("q4_0+gptq").label() == "Q4_0 GPTQ" and parse_recipe("f16").label() == "F16"


@pytest.mark.parametrize("old, new, act_order", [
    ("q4_0-gptq", "gguf:q4_0+gptq", False),
    ("Q3_K_M-GPTQ", "gguf:q3_k_m+gptq", False),
    ("gguf:q4_1-gptq", "gguf:q4_1+gptq", False),
    ("gptq-4bit-128g", "gptq:w4g128", False),
    ("gptq-4bit", "gptq:w4g128", False),
    ("gptq-8bit-noneg", "gptq:w8g-1", False),
    ("gptq-3bit-32g-act", "gptq:w3g32", True),
])
def test_old_spellings_map_with_a_note(old, new, act_order, capsys):
    r = parse_recipe(old)
    assert r.spelling() == new and r.gptq.act_order is act_order
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "old spelling" in err and new.removeprefix("gguf:") in err and old.lower() in err
    parse_recipe(old, warn=False)
    assert capsys.readouterr().err == ""
    assert rc.deprecation_note(old) == err
    assert rc.deprecation_note(new) is None


@pytest.mark.parametrize("text, part, valid", [
    ("q9_0", "'q9_0' is not a llama.cpp file type", "q4_0"),
    ("gguf:q4_0+awq", "method 'awq'", "rtn, gptq"),
    ("onnx:w4g128", "format 'onnx'", "gguf, gptq, compressed-tensors, int8"),
    ("gptq:w4x", "weight spec 'w4x'", "w4g128"),
    ("gptq:w5g128", "does not support 5-bit", "2, 3, 4, 8"),
    ("compressed-tensors:w4g100", "group size 100", "32, 64, 128, 1024 or -1"),
    ("f16+gptq", "GPTQ needs a quantized type", "q4_0+gptq"),
    ("int8+gptq", "int8 takes no spec or method", "int8"),
    ("", "empty recipe", "gguf:TYPE"),
])
def test_bad_strings_name_the_part_and_list_valid_spellings(text, part, valid):
    with pytest.raises(QuantkitError) as e:
        parse_recipe(text)
    msg = str(e.value)
    assert part in msg and valid in msg and "\n" not in msg, msg


def test_flags_that_contradict_the_string_are_named():
    with pytest.raises(QuantkitError, match="--method rtn contradicts --format gguf:q4_0\\+gptq"):
        from_flags("gguf:q4_0+gptq", "rtn")
    with pytest.raises(QuantkitError, match="--bits 3 contradicts --format gptq:w4g128"):
        from_flags("gptq:w4g128", bits=3)
    with pytest.raises(QuantkitError, match="--bits/--asym do not apply to --format gguf:q4_0"):
        from_flags("gguf:q4_0", bits=3, sym=False)
    with pytest.raises(QuantkitError, match="at least 1 sample"):
        from_flags("q4_0+gptq", nsamples=0)
    with pytest.raises(QuantkitError, match="--shrink 2.0 is out of range"):
        from_flags("q4_0+gptq", shrink=2.0)
    # saying the same thing twice is fine; flags fill what the string leaves out
    assert from_flags("gptq:w4g128+gptq", "gptq", bits=4) == parse_recipe("gptq:w4g128+gptq")
    assert from_flags("gptq", "gptq", bits=3, group_size=32, sym=False).spelling() == "gptq:w3g32-asym+gptq"
    assert from_flags(method="dynamic-int8") == parse_recipe("int8")
    with pytest.raises(QuantkitError, match="dynamic-int8 writes an int8 encoder, not --format q4_0"):
        from_flags("q4_0", "dynamic-int8")


def test_defaults_live_in_one_place():
    from quantkit.quant import calib
    from quantkit.quant.gguf_policy import FILE_TYPES
    from quantkit.quant.gptq import DEFAULT_DAMP
    assert tuple(FILE_TYPES) == rc.GGUF_FILE_TYPES
    assert (calib.DEFAULT_NSAMPLES, calib.DEFAULT_SEQLEN) == (rc.DEFAULT_NSAMPLES, rc.DEFAULT_SEQLEN) == (128, 512)
    assert DEFAULT_DAMP == rc.DEFAULT_DAMP == GPTQKnobs().damp
    assert Calibration() == Calibration(None, 128, 512)
    assert rc.LADDER_CALIBRATION == Calibration(None, 16, 256)      # the ladder's fast preset
    # one shrink rule for both API functions: the knob, else the format's default
    assert parse_recipe("q4_0+gptq").shrink == 0.1 and parse_recipe("gptq:w4g128+gptq").shrink == 0.0
    assert from_flags("gptq+gptq", shrink=0.3).shrink == 0.3


def _quantize_args(argv):
    args = build_parser().parse_args(["quantize", "-o", "out", *argv])
    options.apply_config(args)
    return options.recipe_from_args(args)


def test_every_recipe_field_is_a_flag_and_a_config_key():
    keys = build_parser().parse_args(["quantize", "-o", "x"])._actions
    assert set(rc.CONFIG_KEYS) <= set(keys)
    assert set(rc.CONFIG_KEYS) == {"format", "method", "bits", "group_size", "sym", "calib", "nsamples", "seqlen",
                                   *GPTQKnobs.__dataclass_fields__}
    assert set(Recipe().to_dict()) <= set(rc.CONFIG_KEYS)


def test_cli_flags_and_config_file_give_the_same_recipe(tmp_path, capsys):
    want = from_flags("compressed-tensors", "gptq", bits=3, group_size=32, sym=False, calib="c.txt", nsamples=8,
                      seqlen=64, damp=0.02, act_order=True, true_sequential=False, scale_search=False, shrink=0.2)
    assert _quantize_args(["--format", "compressed-tensors", "--method", "gptq", "--bits", "3", "--group-size", "32",
                           "--asym", "--calib", "c.txt", "--nsamples", "8", "--seqlen", "64", "--damp", "0.02",
                           "--act-order", "--no-true-sequential", "--no-scale-search", "--shrink", "0.2"]) == want
    assert _quantize_args(want.to_flags()) == want
    cfg = tmp_path / "q.yaml"
    cfg.write_text("format: compressed-tensors\nmethod: gptq\nbits: 3\ngroup_size: 32\nsym: false\ncalib: c.txt\n"
                   "nsamples: 8\nseqlen: 64\ndamp: 0.02\nact_order: true\ntrue_sequential: false\n"
                   "scale_search: false\nshrink: 0.2\n", encoding="utf-8")
    assert _quantize_args(["--config", str(cfg)]) == want
    cfg.write_text(json.dumps(want.to_dict()), encoding="utf-8")            # JSON, the Recipe's own keys
    assert _quantize_args(["--config", str(cfg)]) == want
    assert _quantize_args(["--config", str(cfg), "--nsamples", "4"]).calibration.nsamples == 4   # flags win
    cfg.write_text("nsamples: 8\ncolour: blue\n", encoding="utf-8")
    code = main(["quantize", "--config", str(cfg), "-o", str(tmp_path / "x.gguf")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "unknown option 'colour'" in err and "valid keys:" in err and "nsamples" in err and str(cfg) in err
    with pytest.raises(QuantkitError, match="unknown key 'colour'.*valid keys: format, method"):
        from_dict({"format": "q4_0", "colour": "blue"})


def test_ladder_commands_share_the_calibration_flags(tmp_path, capsys):
    from quantkit.eval.ladder import ladder_types, parse_rung
    args = build_parser().parse_args(["eval", "--ladder", "q4_0+gptq", "--calib-samples", "8", "--seqlen", "64"])
    assert options.calibration_options(args) == (None, 8, 64)
    err = capsys.readouterr().err
    assert "--calib-samples is the old spelling of --nsamples" in err
    assert build_parser().parse_args(["demo", "--nsamples", "4"]).nsamples == 4
    assert parse_rung("gguf:q4_0+gptq") == ("q4_0", "gptq")
    with pytest.raises(QuantkitError, match="not a GGUF type"):
        parse_rung("gptq:w4g128")
    assert ladder_types(["q8_0", "Q4_0-GPTQ"]) == ["q8_0", "q4_0+gptq"]
    assert "old spelling" in capsys.readouterr().err
    cfg = tmp_path / "e.yaml"
    cfg.write_text("nsamples: 8\nladder: q4_0+gptq\n", encoding="utf-8")
    args = build_parser().parse_args(["eval", "--config", str(cfg)])
    options.apply_config(args)
    assert (args.nsamples, args.ladder) == (8, "q4_0+gptq")


def _json_of(argv, capsys):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_json_on_commands_that_print_tables(bundled_gguf, tmp_path, capsys):
    assert _json_of(["inspect", bundled_gguf, "--json"], capsys)["architecture"]["arch"] == "gemma3"
    assert _json_of(["explain", "Llama-2-13B-chat-GPTQ", "--json"], capsys)["method"] == "gptq"
    p = _json_of(["plan", "llama-2-7b", "--format", "q4_k_m,gguf:q8_0", "--json"], capsys)
    assert [r["format"] for r in p["formats"]] == ["q4_k_m", "q8_0"]
    assert any(d["name"] == "rtx-3060" for d in _json_of(["plan", "--list-devices", "--json"], capsys))
    assert "llama-2-7b" in _json_of(["plan", "--list-models", "--json"], capsys)
    out = tmp_path / "q8.gguf"
    q = _json_of(["-q", "quantize", bundled_gguf, "--format", "q8_0", "-o", str(out), "--json"], capsys)
    assert q["recipe"] == "gguf:q8_0" and q["file_bytes"] == out.stat().st_size and q["tensor_types"]["q8_0"] > 0
    d = _json_of(["-q", "demo", "--out-dir", str(tmp_path / "demo"), "--types", "q8_0", "--max-tokens", "2",
                  "--eval-chunks", "0", "--threads", "1", "--json"], capsys)
    assert [r["rung"] for r in d["rows"]] == ["Q8_0 RTN"] and d["rows"][0]["file_bytes"] > 0
