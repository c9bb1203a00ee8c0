"""Flags shared by the commands that take a recipe or a calibration, and --config FILE.

One set of calibration flags (--calib FILE --nsamples N --seqlen L) on quantize, eval and demo,
their defaults from quantkit.recipe; GPTQ knobs named as GPTQKnobs' fields; a config file holds
the same options under their long-flag names, checked as the flags are.
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import recipe as rc
from ..util import validate as v
from ..util.errors import QuantkitError

# Ranges shared by the commands that take these flags.
MAX_THREADS = 4096
MAX_CTX = 1 << 20                 # tokens per evaluated chunk / sequence
MAX_COUNT = 1_000_000_000         # example limits, chunk counts, steps


def _counted(check):
    """argparse type for --nsamples / --seqlen: a bounded integer numeral; the range (`check`)
    is applied by calibration_options on every command, and to a config file's value at once."""
    t = v.int_arg()
    t.check = check
    return t


def threads_arg():
    """--threads N: 1 to MAX_THREADS."""
    return v.int_arg(1, MAX_THREADS)


def add_calibration_args(g, ladder: bool) -> None:
    """--calib --nsamples --seqlen (None: the recipe's defaults, or the ladder preset's); a
    ladder command also reads its old --calib-samples / --calib-seqlen, hidden."""
    if ladder:
        cal, text = rc.LADDER_CALIBRATION, "the WikiText-2 valid excerpt shipped with quantkit"
        why = (" (the ladder preset: fewer tokens than quantize's "
               f"{rc.DEFAULT_NSAMPLES} x {rc.DEFAULT_SEQLEN}, to keep GPTQ rungs to minutes)")
    else:
        cal, text, why = rc.Calibration(), "wikitext-2 valid, shipped with quantkit", ""
    g.add_argument("--calib", type=v.str_arg(), metavar="FILE", help=f"GPTQ calibration text, any UTF-8 file (default: {text})")
    g.add_argument("--nsamples", type=_counted(rc.check_nsamples), metavar="N", help=f"GPTQ calibration samples (default {cal.nsamples}){why}")
    g.add_argument("--seqlen", type=_counted(rc.check_seqlen), metavar="L", help=f"tokens per calibration sample (default {cal.seqlen})")
    if ladder:
        g.add_argument("--imatrix", metavar="FILE", type=v.str_arg(),
                       help="importance matrix (GGUF or legacy .dat, from `quantkit imatrix` or llama-imatrix) for "
                            "the IQ rungs (default: computed from the calibration above and cached with the rungs)")
        g.add_argument("--calib-samples", dest="old_calib_samples", type=v.int_arg(), help=argparse.SUPPRESS)
        g.add_argument("--calib-seqlen", dest="old_calib_seqlen", type=v.int_arg(), help=argparse.SUPPRESS)


def calibration_options(args) -> tuple[str | None, int | None, int | None]:
    """(calib, nsamples, seqlen) as given; the old ladder flags mapped, with a note."""
    nsamples, seqlen = args.nsamples, args.seqlen
    for old, new, value in (("--calib-samples", "--nsamples", getattr(args, "old_calib_samples", None)),
                            ("--calib-seqlen", "--seqlen", getattr(args, "old_calib_seqlen", None))):
        if value is None:
            continue
        print(f"quantkit: note: {old} is the old spelling of {new}; it is read for one more release",
              file=sys.stderr, flush=True)
        if new == "--nsamples":
            nsamples = value if nsamples is None else nsamples
        else:
            seqlen = value if seqlen is None else seqlen
    # ranges checked here, once, for every command (a usage error from argparse would leave
    # main() by SystemExit instead of returning the one-line error's status)
    return (args.calib, None if nsamples is None else rc.check_nsamples(nsamples),
            None if seqlen is None else rc.check_seqlen(seqlen))


def add_gptq_args(g) -> None:
    """The GPTQ knobs, one flag per GPTQKnobs field."""
    d = rc.GPTQKnobs()
    g.add_argument("--act-order", action="store_const", const=True, default=None,
                   help="GPTQ: visit columns by decreasing activation energy (static groups: no g_idx reordering)")
    g.add_argument("--damp", type=v.float_arg(0.0, rc.MAX_DAMP), default=None,
                   help=f"GPTQ dampening, fraction of the mean Hessian diagonal (default {d.damp}; raised "
                        "automatically if needed)")
    g.add_argument("--shrink", type=v.arg(v.fraction), default=None,
                   help="GPTQ: shrink the Hessian toward its diagonal by this fraction (0: plain GPTQ; 1: "
                        "importance-weighted rounding without cross-column compensation; default "
                        f"{rc.DEFAULT_SHRINK['gguf']} for gguf:* formats, where it measured lower error in and out "
                        f"of domain, {rc.DEFAULT_SHRINK['gptq']} for gptq / compressed-tensors, where it did not "
                        "help at 3 bits)")
    g.add_argument("--no-scale-search", dest="scale_search", action="store_const", const=False, default=None,
                   help="GPTQ: keep the max-based scales (llama.cpp's rule for gguf:* blocks, the group's "
                        "min/max for gptq / compressed-tensors) instead of searching for the scale that "
                        "minimises the importance-weighted block or group error")
    g.add_argument("--no-true-sequential", dest="true_sequential", action="store_const", const=False, default=None,
                   help="GPTQ: calibrate every linear of a block on the block's float inputs (one pass, faster) "
                        "instead of attention, o, MLP up/gate, down in turn on already-quantized outputs")


def recipe_from_args(args) -> rc.Recipe:
    """The Recipe the flags of `quantize` (or a parser shaped like it) say."""
    calib, nsamples, seqlen = calibration_options(args)
    return rc.from_flags(args.format, getattr(args, "method", None), bits=getattr(args, "bits", None),
                         group_size=getattr(args, "group_size", None), sym=getattr(args, "sym", None),
                         calib=calib, nsamples=nsamples, seqlen=seqlen, damp=getattr(args, "damp", None),
                         act_order=getattr(args, "act_order", None),
                         true_sequential=getattr(args, "true_sequential", None),
                         scale_search=getattr(args, "scale_search", None), shrink=getattr(args, "shrink", None))


# ---- --config FILE ---------------------------------------------------------------------------
def add_config_arg(p: argparse.ArgumentParser, command: str) -> None:
    """--config FILE: call after every other flag is added; its keys are those flags' names."""
    acts = [a for a in p._actions if a.dest not in ("help", "config") and a.help != argparse.SUPPRESS]
    keys = list(dict.fromkeys(a.dest for a in acts))
    flags = list(dict.fromkeys(a.dest for a in acts if a.nargs == 0))
    p.add_argument("--config", metavar="FILE",
                   help="YAML or JSON file of these options under their long-flag names (" + ", ".join(keys)
                        + "; on/off flags as true/false: " + ", ".join(flags) + "); flags given on the command "
                          "line win")
    p.set_defaults(_actions={a.dest: a for a in p._actions if a.dest in keys}, _command=command)


MAX_CONFIG_BYTES = 1 << 20        # a config file of options is a few hundred bytes
MAX_CONFIG_VALUES = 10_000        # values once YAML aliases are expanded (a "billion laughs" is billions)


def read_config(path: str) -> dict:
    """The mapping a YAML or JSON config file holds (yaml.safe_load: no object is constructed
    from a tag); a file over MAX_CONFIG_BYTES or whose aliases expand past MAX_CONFIG_VALUES
    values is refused before anything looks at its values."""
    import yaml
    v.as_path(path, "--config")
    try:
        if os.path.getsize(path) > MAX_CONFIG_BYTES:
            raise QuantkitError(f"config file is larger than {MAX_CONFIG_BYTES >> 20} MiB", path,
                                "a config file holds a few options")
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
    except FileNotFoundError:
        raise QuantkitError("no such config file", path) from None
    except IsADirectoryError:
        raise QuantkitError("config path is a directory", path, "give a YAML or JSON file") from None
    except (yaml.YAMLError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise QuantkitError(f"config file is not valid YAML/JSON ({type(e).__name__})", path) from None
    if not isinstance(cfg, dict):
        raise QuantkitError("config file must hold a mapping of option: value", path)
    if v.count_values(cfg, MAX_CONFIG_VALUES) > MAX_CONFIG_VALUES:
        raise QuantkitError(f"config file expands to more than {MAX_CONFIG_VALUES:,} values (YAML aliases?)", path,
                            "write the options out plainly, without anchors and aliases")
    return cfg


def _config_value(key: str, value, act: argparse.Action, path: str):
    """A config file's value for the flag `act`, checked as the flag checks its text: the
    flag's own type check (typed YAML values too: 128, 0.01, .inf), a string where the flag
    takes text, a list of strings where it takes several."""
    name = f"option '{key}'"
    if value is True and act.nargs == "?" and act.const is not None:
        return act.const                              # ladder: true, as a bare --ladder
    many = act.nargs in ("*", "+")
    if many and not isinstance(value, list):
        value = [value]
    items = value if many else [value]
    out = []
    for item in items:
        check = getattr(act.type, "check", None)
        try:
            if check is not None:
                item = check(item)
            elif act.type is None or act.type is str:
                item = v.as_str(item, hint="give text (a path, a recipe, a name)")
            else:
                if not isinstance(item, (str, int, float)) or isinstance(item, bool):
                    v.fail("", item, f"is {v.kind(item)}", "give a single value")
                item = act.type(item)
        except QuantkitError as e:
            raise QuantkitError(f"{name}: {v.echo(item)} is not a valid value: it {e.problem or e}", path,
                                e.hint) from None
        except (TypeError, ValueError, OverflowError, argparse.ArgumentTypeError):
            raise QuantkitError(f"{name}: {v.echo(item)} is not a valid value", path) from None
        if act.choices is not None and item not in act.choices:
            raise QuantkitError(f"{name}: {v.echo(item)} is not one of " + ", ".join(map(str, act.choices)), path)
        out.append(item)
    return out if many else out[0]


def apply_config(args) -> None:
    """Fill options from --config FILE, each checked as its flag would be; options given on the
    command line keep their value."""
    if not getattr(args, "config", None):
        return
    path = args.config
    actions = args._actions
    for key, value in read_config(path).items():
        if not isinstance(key, str):
            raise QuantkitError(f"option name {v.echo(key)} is not text", path, "valid keys: " + ", ".join(actions))
        dest = key.replace("-", "_")
        if dest == "asym" and isinstance(value, bool):      # asym: true, as --asym
            dest, value = "sym", not value
        act = actions.get(dest)
        if act is None:
            raise QuantkitError(f"unknown option {v.echo(key)} in config file", path,
                                "valid keys: " + ", ".join(actions))
        given = getattr(args, dest)
        if given != act.default and not (act.nargs in ("*", "+") and given == []):
            continue                                  # given on the command line
        if act.nargs == 0:                            # an on/off flag: true/false under its option name
            if not isinstance(value, bool):
                raise QuantkitError(f"option '{key}' takes true or false, got {v.echo(value)}", path)
        elif value is not None:
            value = _config_value(key, value, act, path)
        setattr(args, dest, value)


def add_trust_pickle_arg(p: argparse.ArgumentParser) -> None:
    """--trust-pickle: read pytorch_model*.bin weights (pickles). A flag only, never a --config key,
    so a downloaded config file cannot opt in; add it after add_config_arg."""
    p.add_argument("--trust-pickle", action="store_true",
                   help="read a Hugging Face directory whose weights are pytorch_model*.bin (a pickle; loaded with "
                        "torch.load(weights_only=True)); without it such a model is refused: convert it to "
                        "safetensors instead")


def print_json(obj) -> None:
    import json
    print(json.dumps(obj, indent=2, default=str))
