"""What to make, in one grammar, parsed once into a typed Recipe that every command and API
function takes.

    gguf:q4_0                     llama.cpp's Q4_0 by round to nearest (byte for byte as llama-quantize)
    gguf:q4_0+gptq                the same file layout, weights solved by GPTQ onto Q4_0's own grid
    q4_0, q4_0+gptq               a bare llama.cpp file type is short for gguf:TYPE (a ladder rung)
    gptq:w4g128                   a GPTQ-packed checkpoint (AutoGPTQ / GPTQModel layout): 4-bit weights,
                                  one scale per 128 input columns, symmetric, by round to nearest
    gptq:w4g128+gptq              the same checkpoint, solved by GPTQ
    compressed-tensors:w4g128-asym+gptq    pack-quantized, with a zero point per group
    gptq:w8g-1                    group -1: one scale per output channel
    int8                          dynamic int8 of a BERT-family encoder (weights per output channel)

FORMAT[:SPEC][+METHOD]: the format is the file that is written ("gptq" names the checkpoint
layout, not the solver); +METHOD is how the weights are found, rtn unless it says +gptq (the
canonical spelling leaves +rtn out). Calibration (file, samples, tokens per sample) and the
GPTQ knobs are not part of the string: they come from flags (--calib --nsamples --seqlen
--damp ...) or config keys of the same names, and every default is defined here, once.

Old spellings ("q4_0-gptq", "gptq-4bit-128g") still parse, with a one-line note on stderr.
"""

from __future__ import annotations

import re
import sys
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .util import validate as v
from .util.errors import QuantkitError

FORMATS = ("gguf", "gptq", "compressed-tensors", "int8")
GPU_FORMATS = ("gptq", "compressed-tensors")
METHODS = ("rtn", "gptq")
# llama.cpp file types quantkit writes (quant.gguf_policy.FILE_TYPES holds their tensor mixes;
# tests/test_recipe.py checks the two lists agree).
GGUF_FILE_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "q6_k", "q5_k_m", "q5_k_s",
                   "q4_k_m", "q4_k_s", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k", "q2_k_s", "iq4_xs", "iq4_nl", "iq3_m",
                   "iq3_s", "iq3_xs", "iq3_xxs", "iq2_m", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s", "tq2_0",
                   "tq1_0")
FLOAT_TYPES = ("f32", "f16", "bf16")          # nothing for GPTQ to solve
FORMAT_BITS = {"gptq": (2, 3, 4, 8), "compressed-tensors": (2, 3, 4, 5, 6, 8)}
GROUP_SIZES = (32, 64, 128, 1024, -1)          # -1: one scale per output channel

# ---- every default, once --------------------------------------------------------------------
DEFAULT_FORMAT = "gguf:q4_0"
DEFAULT_BITS = 4
DEFAULT_GROUP_SIZE = 128
DEFAULT_NSAMPLES = 128           # calibration samples for `quantize` (GPTQ's usual 128 x 512)
DEFAULT_SEQLEN = 512             # tokens per calibration sample
DEFAULT_DAMP = 0.01              # fraction of mean(diag(H)) added to the Hessian's diagonal
# Hessian shrinkage toward its diagonal when none is given: 0.1 onto llama.cpp grids (lower KL
# divergence than 0 for Q4_0, Q4_1 and Q3_K_M, in and out of domain; BENCHMARKS.md), 0 for the
# GPU formats (it did not help at 3 bits).
DEFAULT_SHRINK = {"gguf": 0.1, "gptq": 0.0, "compressed-tensors": 0.0}
# The ladder's GPTQ rungs (eval --ladder, demo) calibrate on fewer tokens, 16 x 256 of a shipped
# WikiText-2 *valid* excerpt (the ladder scores *test* text): enough to beat RTN, minutes rather
# than tens of minutes on 2 cores.
LADDER_NSAMPLES = 16
LADDER_SEQLEN = 256
LADDER_CALIB_TEXT = "wikitext2-valid-excerpt.txt"     # under quantkit/data
# Ranges the flags, config keys and API arguments are held to (absurd values end in one line
# before any work starts, not in an allocation failure an hour later).
MAX_NSAMPLES = 1 << 20
MAX_SEQLEN = 1 << 20
MAX_DAMP = 1.0                   # a fraction of the mean Hessian diagonal
MAX_RECIPE_TEXT = 100            # the longest recipe spelled is under 40 characters
CALIB_TEXT = "wikitext-2/valid.txt"                   # quantize's default, under quantkit/data


def calib_text_path(ladder: bool = False) -> str:
    """The default calibration text shipped with quantkit: wikitext-2 valid, or (ladder) its excerpt."""
    from .util.data import data_file
    return data_file(LADDER_CALIB_TEXT if ladder else CALIB_TEXT)


@dataclass(frozen=True)
class Calibration:
    """GPTQ's calibration: `nsamples` chunks of `seqlen` tokens of `file` (None: the default text)."""
    file: str | None = None
    nsamples: int = DEFAULT_NSAMPLES
    seqlen: int = DEFAULT_SEQLEN

    def __post_init__(self):
        if self.file is not None:
            object.__setattr__(self, "file", v.as_path(self.file, "--calib"))
        object.__setattr__(self, "nsamples", check_nsamples(self.nsamples))
        object.__setattr__(self, "seqlen", check_seqlen(self.seqlen))


def check_nsamples(n) -> int:
    """--nsamples: calibration samples, 1 to MAX_NSAMPLES (flags, config keys, API arguments)."""
    return v.as_int(n, "--nsamples", 1, MAX_NSAMPLES,
                    hint=f"GPTQ calibration needs at least 1 sample; give 1 to {MAX_NSAMPLES:,}")


def check_seqlen(n) -> int:
    """--seqlen: tokens per calibration sample, 2 to MAX_SEQLEN."""
    return v.as_int(n, "--seqlen", 2, MAX_SEQLEN,
                    hint=f"GPTQ calibration needs samples of at least 2 tokens; give 2 to {MAX_SEQLEN:,}")


LADDER_CALIBRATION = Calibration(None, LADDER_NSAMPLES, LADDER_SEQLEN)


@dataclass(frozen=True)
class GPTQKnobs:
    """How GPTQ solves (ignored by rtn). `shrink` None: the format's default (DEFAULT_SHRINK)."""
    damp: float = DEFAULT_DAMP
    act_order: bool = False
    true_sequential: bool = True
    scale_search: bool = True
    shrink: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "damp", v.as_float(self.damp, "--damp", 0.0, MAX_DAMP,
                                                    hint="give a fraction from 0 to 1, such as 0.01"))
        if self.shrink is not None:
            object.__setattr__(self, "shrink", v.fraction(self.shrink, "--shrink",
                                                          hint="give a fraction from 0 to 1, such as 0.1"))
        for name, flag in (("act_order", "--act-order"), ("true_sequential", "--no-true-sequential"),
                           ("scale_search", "--no-scale-search")):
            if not isinstance(getattr(self, name), bool):
                v.fail(flag, getattr(self, name), "is not true or false", "an on/off option takes true or false")


@dataclass(frozen=True)
class Recipe:
    """One thing to make. gguf: `type` is the llama.cpp file type, which fixes bits, blocks and
    zero points (bits, group_size, sym are None); gptq / compressed-tensors: bits, group_size,
    sym; int8: 8 bits per output channel, symmetric, method "dynamic-int8"."""
    format: str = "gguf"
    type: str | None = None       # gguf: None is DEFAULT_FORMAT's type, q4_0
    method: str = "rtn"
    bits: int | None = None
    group_size: int | None = None
    sym: bool | None = None
    calibration: Calibration = field(default_factory=Calibration)
    gptq: GPTQKnobs = field(default_factory=GPTQKnobs)

    def __post_init__(self):
        _validate(self)

    @property
    def shrink(self) -> float:
        """The Hessian shrinkage GPTQ uses: the knob, or the format's default."""
        return DEFAULT_SHRINK.get(self.format, 0.0) if self.gptq.shrink is None else self.gptq.shrink

    def spelling(self, short: bool = False) -> str:
        """The canonical string; `short`: a GGUF recipe without "gguf:" (a ladder rung)."""
        if self.format == "int8":
            return "int8"
        if self.format == "gguf":
            head = self.type if short else f"gguf:{self.type}"
        else:
            head = f"{self.format}:{weight_spec(self.bits, self.group_size, self.sym)}"
        return head + ("" if self.method == "rtn" else f"+{self.method}")

    def label(self) -> str:
        """As a table shows it: "Q4_0 RTN", "Q4_0 GPTQ", "F16", "gptq:w4g128 GPTQ"."""
        if self.format == "gguf":
            return self.type.upper() if self.type in FLOAT_TYPES else f"{self.type.upper()} {self.method.upper()}"
        if self.format == "int8":
            return "INT8 DYNAMIC"
        return f"{self.spelling().split('+')[0]} {self.method.upper()}"

    def to_dict(self) -> dict[str, Any]:
        """The flat mapping of CONFIG_KEYS a config file holds (the string and every knob)."""
        return {"format": self.spelling(), "calib": self.calibration.file, "nsamples": self.calibration.nsamples,
                "seqlen": self.calibration.seqlen, **asdict(self.gptq)}

    def to_flags(self) -> list[str]:
        """Command-line flags that give this recipe back through from_flags / the CLI."""
        out = ["--format", self.spelling()]
        if self.calibration.file is not None:
            out += ["--calib", self.calibration.file]
        out += ["--nsamples", str(self.calibration.nsamples), "--seqlen", str(self.calibration.seqlen),
                "--damp", repr(self.gptq.damp)]
        if self.gptq.shrink is not None:
            out += ["--shrink", repr(self.gptq.shrink)]
        out += [f for f, on in (("--act-order", self.gptq.act_order),
                                ("--no-true-sequential", not self.gptq.true_sequential),
                                ("--no-scale-search", not self.gptq.scale_search)) if on]
        return out


def weight_spec(bits: int, group_size: int, sym: bool = True) -> str:
    """"w4g128", "w8g-1-asym": bits, group size and symmetry of an integer grid."""
    return f"w{bits}g{group_size}" + ("" if sym else "-asym")


_SPEC = re.compile(r"w(\d+)(?:g(-1|\d+))?(?:-(sym|asym))?")
SPEC_HELP = "wBITS[gGROUP][-asym], e.g. w4g128, w3g32-asym, w8g-1 (-1: per output channel)"


def parse_weight_spec(spec: str, what: str = "recipe") -> tuple[int, int, bool]:
    """"w4g128" -> (4, 128, True); "w8g-1-asym" -> (8, -1, False); the group defaults to 128."""
    m = _SPEC.fullmatch(spec)
    if not m:
        raise QuantkitError(f"{what}: weight spec '{spec}' does not parse", hint=f"write {SPEC_HELP}")
    return int(m.group(1)), DEFAULT_GROUP_SIZE if m.group(2) is None else int(m.group(2)), m.group(3) != "asym"


def valid_spellings() -> str:
    return ("gguf:TYPE or TYPE with TYPE one of " + ", ".join(GGUF_FILE_TYPES) + " (+gptq for GPTQ); "
            "gptq:SPEC or compressed-tensors:SPEC with SPEC " + SPEC_HELP + " (+gptq for GPTQ); int8")


def _validate(r: Recipe) -> None:
    for f in ("format", "method", "type"):
        if getattr(r, f) is not None or f != "type":
            v.as_str(getattr(r, f), f"recipe {f}", max_len=MAX_RECIPE_TEXT)
    for f in ("bits", "group_size"):
        if getattr(r, f) is not None:
            v.as_int(getattr(r, f), f"--{f.replace('_', '-')}", -1, 1024)
    if r.sym is not None and not isinstance(r.sym, bool):
        v.fail("--sym/--asym", r.sym, "is not true or false", "sym: true (symmetric) or false (with zero points)")
    name = f"recipe '{_spell_loosely(r)}'"
    if r.format not in FORMATS:
        raise QuantkitError(f"{name}: unknown format '{r.format}'",
                            hint="formats: " + ", ".join(FORMATS) + "; spellings: " + valid_spellings())
    methods = ("dynamic-int8",) if r.format == "int8" else METHODS
    if r.method not in methods:
        raise QuantkitError(f"{name}: unknown method '{r.method}' for {r.format}", hint="methods: " + ", ".join(methods))
    if r.format == "gguf":
        if r.type is None:
            object.__setattr__(r, "type", DEFAULT_FORMAT.split(":")[1])
        if r.type not in GGUF_FILE_TYPES:
            raise QuantkitError(f"{name}: '{r.type}' is not a llama.cpp file type quantkit writes",
                                hint="types: " + ", ".join(GGUF_FILE_TYPES))
        if r.method == "gptq" and r.type in FLOAT_TYPES:
            raise QuantkitError(f"{name}: GPTQ needs a quantized type, not a float one",
                                hint="e.g. q4_0+gptq or q3_k_m+gptq")
        if (r.bits, r.group_size, r.sym) != (None, None, None):
            raise QuantkitError(f"{name}: bits, group_size and sym do not apply to gguf: a llama.cpp type fixes "
                                "its own bits, blocks and zero points", hint="pick the type, e.g. gguf:q4_1")
        return
    if r.type is not None:
        raise QuantkitError(f"{name}: a llama.cpp type does not apply to {r.format}", hint=valid_spellings())
    if r.format == "int8":
        if (r.bits, r.group_size, r.sym) not in ((None, None, None), (8, -1, True)):
            raise QuantkitError(f"{name}: int8 is 8-bit, per output channel, symmetric", hint="write int8")
        object.__setattr__(r, "bits", 8)
        object.__setattr__(r, "group_size", -1)
        object.__setattr__(r, "sym", True)
        return
    for f, default in (("bits", DEFAULT_BITS), ("group_size", DEFAULT_GROUP_SIZE), ("sym", True)):
        if getattr(r, f) is None:
            object.__setattr__(r, f, default)
    if r.bits not in FORMAT_BITS[r.format]:
        raise QuantkitError(f"{name}: {r.format} does not support {r.bits}-bit weights",
                            hint="bits " + ", ".join(map(str, FORMAT_BITS[r.format])))
    if r.group_size not in GROUP_SIZES:
        raise QuantkitError(f"{name}: group size {r.group_size} is not supported",
                            hint="use 32, 64, 128, 1024 or -1 (per channel)")


def _spell_loosely(r: Recipe) -> str:
    """A name for a recipe that may not validate (for its own error message)."""
    if r.format == "gguf":
        head = f"gguf:{r.type}"
    elif r.format in GPU_FORMATS and r.bits is not None:
        head = f"{r.format}:w{r.bits}g{r.group_size if r.group_size is not None else DEFAULT_GROUP_SIZE}" \
               + ("-asym" if r.sym is False else "")
    else:
        head = r.format
    return head + ("" if r.method == "rtn" else f"+{r.method}")


# ---- parsing --------------------------------------------------------------------------------
_OLD_GPTQ_NAME = re.compile(r"gptq[-_]?(\d+)bit(?:[-_](\d+|none)g)?([-_]act(?:[-_]?order)?)?")


@dataclass(frozen=True)
class Parsed:
    """A recipe string taken apart: what it said explicitly (None: not said) and, for an old
    spelling, the note to print."""
    format: str
    type: str | None
    method: str | None
    bits: int | None
    group_size: int | None
    sym: bool | None
    act_order: bool | None = None
    note: str | None = None


def split_recipe(text: str) -> Parsed:
    """Take a recipe string apart without filling defaults (from_flags merges flags into it)."""
    s = str(text).strip().lower()
    if not s:
        raise QuantkitError("empty recipe", hint=valid_spellings())
    if len(s) > MAX_RECIPE_TEXT:
        v.fail("recipe", text, f"is too long ({len(s):,} characters)", valid_spellings())
    old = _old_spelling(s)
    if old is not None:
        return old
    head, plus, method = s.partition("+")
    if plus and method not in METHODS:
        raise QuantkitError(f"recipe '{text}': method '{method}' is not one of {', '.join(METHODS)}",
                            hint=valid_spellings())
    method = method if plus else None
    fmt, colon, spec = head.partition(":")
    if not colon and fmt not in FORMATS:         # a bare llama.cpp type: gguf:TYPE
        fmt, spec, colon = "gguf", fmt, ":"
    if fmt not in FORMATS:
        raise QuantkitError(f"recipe '{text}': format '{fmt}' is not one of {', '.join(FORMATS)}",
                            hint=valid_spellings())
    if fmt == "gguf":
        if spec not in GGUF_FILE_TYPES:
            raise QuantkitError(f"recipe '{text}': '{spec or '(nothing)'}' is not a llama.cpp file type quantkit "
                                "writes", hint="types: " + ", ".join(GGUF_FILE_TYPES) + "; +gptq for GPTQ")
        return Parsed("gguf", spec, method, None, None, None)
    if fmt == "int8":
        if colon or plus:
            raise QuantkitError(f"recipe '{text}': int8 takes no spec or method", hint="write int8")
        return Parsed("int8", None, "dynamic-int8", None, None, None)
    if not colon:
        return Parsed(fmt, None, method, None, None, None)
    bits, group, sym = parse_weight_spec(spec, f"recipe '{text}'")
    explicit_group = "g" in spec
    return Parsed(fmt, None, method, bits, group if explicit_group else None,
                  sym if ("-asym" in spec or "-sym" in spec) else None)


def _old_spelling(s: str) -> Parsed | None:
    """"q4_0-gptq" (the ladder's rungs) and "gptq-4bit-128g[-act]" (plan's names): still read."""
    if s.endswith("-gptq") and s[:-5].removeprefix("gguf:") in GGUF_FILE_TYPES:
        ft = s[:-5].removeprefix("gguf:")
        return Parsed("gguf", ft, "gptq", None, None, None, None, _note(s, f"{ft}+gptq"))
    m = _OLD_GPTQ_NAME.fullmatch(s)
    if m:
        bits = int(m.group(1))
        group = DEFAULT_GROUP_SIZE if m.group(2) is None else (-1 if m.group(2) == "none" else int(m.group(2)))
        new = f"gptq:{weight_spec(bits, group)}"
        act = bool(m.group(3))
        return Parsed("gptq", None, None, bits, group, None, act or None,
                      _note(s, new + (" with --act-order" if act else "")))
    return None


def deprecation_note(text: str) -> str | None:
    """The note for an old spelling (rungs, GPTQ / AWQ names), None for anything else."""
    s = str(text).strip().lower()
    m = re.fullmatch(r"awq[-_]?(\d+)bit(?:[-_](\d+|none)g)?", s)
    if m:
        group = DEFAULT_GROUP_SIZE if m.group(2) is None else (-1 if m.group(2) == "none" else int(m.group(2)))
        return _note(s, f"awq:{weight_spec(int(m.group(1)), group)}")
    old = _old_spelling(s)
    return old.note if old is not None else None


def _note(old: str, new: str) -> str:
    return f"quantkit: note: '{old}' is the old spelling of '{new}'; it is read for one more release"


def warn_deprecated(note: str | None) -> None:
    if note:
        print(note, file=sys.stderr, flush=True)


def parse_recipe(text: str, *, warn: bool = True) -> Recipe:
    """A recipe string -> Recipe (default calibration and knobs). Old spellings print a note
    to stderr (unless `warn` is False)."""
    p = split_recipe(text)
    if warn:
        warn_deprecated(p.note)
    knobs = GPTQKnobs(act_order=True) if p.act_order else GPTQKnobs()
    return Recipe(p.format, p.type, p.method or "rtn", p.bits, p.group_size, p.sym, gptq=knobs)


def from_flags(format: str | None = None, method: str | None = None, *,  # noqa: A002
               bits: int | None = None, group_size: int | None = None, sym: bool | None = None,
               calib: str | None = None, nsamples: int | None = None, seqlen: int | None = None,
               damp: float | None = None, act_order: bool | None = None, true_sequential: bool | None = None,
               scale_search: bool | None = None, shrink: float | None = None,
               calibration: Calibration | None = None, warn: bool = True) -> Recipe:
    """A Recipe from loose options, as the CLI flags and the API's keyword arguments give them
    (None: not given). The format string may carry the method and the weight spec; a flag that
    says the same again is fine, one that contradicts it is an error. `calibration`: the
    defaults for calib/nsamples/seqlen not given (LADDER_CALIBRATION for ladder rungs)."""
    if method == "dynamic-int8" and format is None:
        format = "int8"  # noqa: A001
    text = DEFAULT_FORMAT if format is None else format
    p = split_recipe(text)
    if warn:
        warn_deprecated(p.note)
    if method is not None and p.method is not None and method != p.method:
        raise QuantkitError(f"--method {method} contradicts --format {text}",
                            hint=f"give one: --format {text} alone, or drop its +{p.method}")
    m = method or p.method or "rtn"
    if p.format == "gguf":
        given = [f for f, v in (("--bits", bits), ("--group-size", group_size), ("--asym", sym is False)) if v]
        if given:
            raise QuantkitError(f"{'/'.join(given)} do not apply to --format {text}: a llama.cpp type fixes its own "
                                "bits, blocks and zero points",
                                hint="pick the type instead, e.g. gguf:q4_1 for 4 bits with a minimum; or write "
                                     "--format gptq or compressed-tensors")
    elif p.format == "int8":
        if m != "dynamic-int8":
            raise QuantkitError(f"--method {m} does not make --format int8", hint="int8 is --method dynamic-int8")
    else:
        for flag, v, said in (("--bits", bits, p.bits), ("--group-size", group_size, p.group_size),
                              ("--sym/--asym", sym, p.sym)):
            if v is not None and said is not None and v != said:
                raise QuantkitError(f"{flag} {v} contradicts --format {text}", hint="say it once")
    if m == "dynamic-int8" and p.format != "int8":
        raise QuantkitError(f"--method dynamic-int8 writes an int8 encoder, not --format {text}",
                            hint="leave --format out, or write --format int8")
    base = calibration or Calibration()
    cal = Calibration(calib if calib is not None else base.file,
                      nsamples if nsamples is not None else base.nsamples,
                      seqlen if seqlen is not None else base.seqlen)
    knobs = GPTQKnobs(damp=DEFAULT_DAMP if damp is None else damp,
                      act_order=bool(act_order if act_order is not None else p.act_order),
                      true_sequential=True if true_sequential is None else true_sequential,
                      scale_search=True if scale_search is None else scale_search, shrink=shrink)
    if p.format == "gguf":
        return Recipe("gguf", p.type, m, calibration=cal, gptq=knobs)
    return Recipe(p.format, None, m, bits if bits is not None else p.bits,
                  group_size if group_size is not None else p.group_size,
                  sym if sym is not None else p.sym, cal, knobs)


# Keys of a config file (and of Recipe.to_dict): the recipe string and every calibration / GPTQ
# option, named as their long flags are.
CONFIG_KEYS = ("format", "method", "bits", "group_size", "sym", "calib", "nsamples", "seqlen",
               *(f.name for f in fields(GPTQKnobs)))


def from_dict(d: dict[str, Any], *, where: str | None = None, calibration: Calibration | None = None) -> Recipe:
    """A Recipe from a mapping of CONFIG_KEYS (a config file); an unknown key is named, with the
    valid ones."""
    unknown = [k for k in d if k not in CONFIG_KEYS]
    if unknown:
        raise QuantkitError(f"unknown key '{unknown[0]}'", where, "valid keys: " + ", ".join(CONFIG_KEYS))
    return from_flags(**d, calibration=calibration)


__all__ = ["Recipe", "Calibration", "GPTQKnobs", "parse_recipe", "split_recipe", "deprecation_note", "from_flags", "from_dict",
           "check_nsamples", "check_seqlen",
           "weight_spec", "parse_weight_spec", "valid_spellings", "CONFIG_KEYS", "LADDER_CALIBRATION",
           "DEFAULT_NSAMPLES", "DEFAULT_SEQLEN", "DEFAULT_DAMP", "DEFAULT_SHRINK", "DEFAULT_FORMAT"]
