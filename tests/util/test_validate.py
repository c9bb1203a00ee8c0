"""quantkit.util.validate: typed, ranged checks whose one-line messages name the value, say what
is wrong and what to give, and never echo more than 300 characters of it."""

import argparse
import math

import pytest

from quantkit.util import validate as v
from quantkit.util.errors import MESSAGE_LIMIT, PATH_LIMIT, QuantkitError, clip


def _msg(fn, *args, **kw) -> str:
    with pytest.raises(QuantkitError) as e:
        fn(*args, **kw)
    s = str(e.value)
    assert "\n" not in s and len(s) <= PATH_LIMIT + 2 * MESSAGE_LIMIT + 10, s
    return s


@pytest.mark.parametrize("value,want", [(5, 5), ("5", 5), (" 12 ", 12), ("-3", -3), (128.0, 128), ("+7", 7)])
def test_as_int_accepts_integers_numerals_and_whole_floats(value, want):
    got = v.as_int(value, "--n", -10, 200)
    assert got == want and type(got) is int


@pytest.mark.parametrize("value,problem", [
    (True, "is not an integer"), ("abc", "is not an integer"), ("1.5", "is not an integer"),
    (1.5, "is not a whole number"), (math.inf, "is not a whole number"), (math.nan, "is not a whole number"),
    ([1, 2], "is a list, not an integer"), ({"a": 1}, "is a mapping, not an integer"), (None, "is null"),
    ("9" * 5000, "is too long for a number (5,000 characters)"),
    (0, "is out of range"), (10**30, "is out of range"), ("-1", "is out of range"),
])
def test_as_int_refuses_with_the_name_and_the_range(value, problem):
    m = _msg(v.as_int, value, "--batch-size", 1, 65536)
    assert m.startswith("--batch-size ") and problem.split(" (")[0].split(", not")[0] in m, m
    assert "give an integer from 1 to 65,536" in m
    assert len(m) < 400


def test_positive_int_and_open_ranges():
    assert v.positive_int("3", "--n") == 3
    assert "give an integer of at least 1" in _msg(v.positive_int, 0, "--n")
    assert "of at most 5" in _msg(v.as_int, 6, "--n", None, 5)


@pytest.mark.parametrize("value,want", [(0.5, 0.5), ("1e-3", 1e-3), (1, 1.0), ("  0.25 ", 0.25)])
def test_as_float(value, want):
    assert v.as_float(value, "--damp", 0, 1) == want


@pytest.mark.parametrize("value,problem", [
    ("nan", "is not a finite number"), (math.inf, "is not a finite number"), ("-inf", "is not a finite number"),
    ("1e999", "is not a finite number"), (10**400, "is too large"), ("x", "is not a number"),
    (False, "is not a number"), ([0.1], "is a list, not a number"), (-0.5, "is out of range"),
    (1.5, "is out of range"),
])
def test_as_float_refuses(value, problem):
    m = _msg(v.as_float, value, "--damp", 0, 1)
    assert m.startswith("--damp ") and problem in m and "give a number from 0 to 1" in m, m


def test_open_lower_bound_and_fraction():
    assert "give a number above 0" in _msg(v.positive_float, 0, "--vram")
    assert v.positive_float("1e-9", "--vram") == 1e-9
    assert v.fraction("1", "--alpha") == 1.0 and v.fraction(0, "--alpha") == 0.0
    assert "give a fraction from 0 to 1" in _msg(v.fraction, 1.01, "--alpha")


def test_one_of_str_and_path(tmp_path):
    assert v.one_of("f16", "--kv-type", ["f16", "q8_0"]) == "f16"
    m = _msg(v.one_of, "f17", "--kv-type", ["f16", "q8_0"])
    assert "--kv-type 'f17' is not one of the choices" in m and "one of: f16, q8_0" in m
    assert "is not one of" in _msg(v.one_of, True, "--x", [1, 0])          # true is not 1
    assert v.as_str("abc", "--name") == "abc"
    assert "is empty" in _msg(v.as_str, "  ", "--name")
    assert "is an integer, not a string" in _msg(v.as_str, 5, "option 'calib'")
    assert "is too long (11 characters, at most 10)" in _msg(v.as_str, "x" * 11, "--name", max_len=10)
    assert "NUL" in _msg(v.as_str, "a\0b", "--name")
    f = tmp_path / "f.txt"
    f.write_text("x")
    assert v.as_path(f, "--calib", exists="file") == str(f)
    assert v.as_path(str(tmp_path), "--out-dir", exists="dir") == str(tmp_path)
    assert "does not exist" in _msg(v.as_path, str(tmp_path / "nope"), "--calib", exists="any")
    assert "is not a file" in _msg(v.as_path, str(tmp_path), "--calib", exists="file")
    assert "is not a directory" in _msg(v.as_path, str(f), "--out-dir", exists="dir")


def test_echo_is_bounded_even_for_huge_and_self_referencing_values():
    big = "y" * 1_000_000
    assert len(v.echo(big)) <= v.ECHO_LIMIT
    nested = ["x"] * 9
    for _ in range(12):                      # 9^13 leaves, shared: the YAML alias bomb's shape
        nested = [nested] * 9
    assert len(v.echo(nested)) <= v.ECHO_LIMIT
    loop: list = []
    loop.append(loop)
    assert len(v.echo(loop)) <= v.ECHO_LIMIT
    assert "\n" not in v.echo("two\nlines") and "\\n" in v.echo("two\nlines")
    m = _msg(v.as_str, nested, "option 'format'")
    assert len(m) < 500 and "is a list, not a string" in m


def test_count_values_stops_at_its_limit():
    nested = ["x"] * 9
    for _ in range(12):
        nested = [nested] * 9
    assert v.count_values(nested, 1000) == 1001          # stopped, not 9^13
    assert v.count_values({"a": [1, 2], "b": 3}, 100) == 7      # the mapping, 2 keys, the list, 3 scalars
    loop: list = []
    loop.append(loop)
    assert v.count_values(loop, 50) == 51


def test_argparse_types_name_the_flag_and_keep_the_check_for_config_files(capsys):
    p = argparse.ArgumentParser(prog="t", exit_on_error=False)
    p.add_argument("--ctx", type=v.int_arg(8, 1024))
    p.add_argument("--lr", type=v.float_arg(0, 1, lo_open=True))
    assert p.parse_args(["--ctx", "512", "--lr", "0.5"]).ctx == 512
    with pytest.raises(argparse.ArgumentError, match="argument --ctx: 4 is out of range \\(give an integer from 8 to 1,024\\)"):
        p.parse_args(["--ctx", "4"])
    with pytest.raises(argparse.ArgumentError, match="argument --lr: 0.0 is out of range \\(give a number above 0"):
        p.parse_args(["--lr", "0"])
    check = p._option_string_actions["--ctx"].type.check
    assert check(16) == 16
    with pytest.raises(QuantkitError, match="inf is not a whole number") as e:
        check(math.inf)
    assert e.value.problem == "is not a whole number"


def test_error_line_is_one_line_and_capped():
    e = QuantkitError("value " + "z" * 100_000, "/tmp/" + "p" * 10_000, "do " + "h" * 10_000)
    s = str(e)
    assert "\n" not in s and len(s) <= PATH_LIMIT + 2 * MESSAGE_LIMIT + 10
    assert s.startswith("/tmp/ppp") and "…" in s
    assert str(QuantkitError("bad\nvalue", "a\nb")) == "a\\nb: bad\\nvalue"
    assert clip("abc", 10) == "abc" and len(clip("a" * 50, 10)) == 10
