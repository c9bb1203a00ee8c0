"""A ladder: one model quantized to several GGUF rungs, each a llama.cpp file type made by
llama.cpp's own round-to-nearest ("q4_0") or by GPTQ onto the same type ("q4_0+gptq"), built
into quantkit's cache (re-used between runs) or a folder, then scored together (api.eval_ladder,
quantkit demo). IQ rungs ("iq4_xs") are round-to-nearest with an importance matrix, as
llama-quantize --imatrix makes them: the one given, or one computed from the ladder's
calibration and cached beside the rungs."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass

from ..recipe import DEFAULT_SHRINK, LADDER_CALIBRATION, calib_text_path, parse_recipe, valid_spellings
from ..runtimes import split_spec
from ..util.errors import QuantkitError
from . import cache as eval_cache
from .cache import cache_root, model_digest, sha256_file
from .results import EvalResult

# A rung is a recipe (quantkit.recipe) of a GGUF file type: llama.cpp's own round-to-nearest
# ("q4_0"), or the same type with GPTQ-compensated weights ("q4_0+gptq": quant.gguf_gptq,
# calibrated on a text). Rung files keep the name "TYPE-gptq.gguf", so cached rungs stay valid.
GPTQ_SUFFIX = "-gptq"
DEFAULT_LADDER = ["f16", "q8_0", "q5_0", "q4_1", "q4_0", "q4_0+gptq"]
LADDER_KQUANTS = ["q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k"]
# IQ rungs of the default ladder, each beside the K-quant mix of about its size (Q4_K_M, Q3_K_M,
# Q2_K): where the importance-matrix types pay shows on the report's Pareto front
LADDER_IQ = ["iq4_xs", "iq3_s", "iq2_m"]
# GPTQ rungs calibrate as recipe.LADDER_CALIBRATION says: few tokens of a shipped WikiText-2
# *valid* excerpt (the eval scores *test* text).
CALIB_TEXT = calib_text_path(ladder=True)
DEFAULT_CALIB_SAMPLES = LADDER_CALIBRATION.nsamples
DEFAULT_CALIB_SEQLEN = LADDER_CALIBRATION.seqlen
GPTQ_RUNG_VERSION = "2"                  # bump when the GPTQ rung's recipe changes: cached rungs are rebuilt
IMATRIX_VERSION = "1"                    # bump when the ladder's imatrix computation changes
IMATRIX_PREFIX = "iq"                    # file types quantized with an importance matrix in a ladder


def uses_imatrix(file_type: str) -> bool:
    """Whether a ladder rung of FILE_TYPE is quantized with an importance matrix (the IQ types;
    the ternary TQ types ignore one in llama.cpp, the legacy and K-quant rungs stay plain RTN)."""
    return file_type.startswith(IMATRIX_PREFIX)


def parse_rung(name: str, warn: bool = True) -> tuple[str, str]:
    """"q4_0" / "gguf:q4_0" -> ("q4_0", "rtn"); "q4_0+gptq" -> ("q4_0", "gptq"); the old
    "q4_0-gptq" too, with a note on stderr (unless `warn` is False). A budget rung
    ("gguf:bpw4.5+gptq", "size=300MB") -> ("bpw4.5", "gptq") (quant.budget)."""
    budget = _budget_rung(name)
    if budget is not None:
        return budget[0].spelling(), budget[1]
    r = parse_recipe(name, warn=warn)
    if r.format != "gguf":
        raise QuantkitError(f"ladder rung '{name}' is {r.format}, not a GGUF type", hint=valid_spellings())
    return r.type, r.method


def rung_label(name: str) -> str:
    """"q4_0" -> "Q4_0 RTN", "q4_0+gptq" -> "Q4_0 GPTQ", "f16" -> "F16", "bpw4.5+gptq" -> "bpw4.5 GPTQ"."""
    budget = _budget_rung(name.replace(GPTQ_SUFFIX, "+gptq") if name.endswith(GPTQ_SUFFIX) else name)
    if budget is not None:
        return f"{budget[0].spelling()} {budget[1].upper()}"
    return parse_recipe(name, warn=False).label()


def _budget_rung(name: str):
    """(Budget, method) of a budget rung, None for a file type; a fit rung is refused (a ladder
    has no device)."""
    from ..quant.budget import split_budget_rung
    rung = split_budget_rung(name)
    if rung is not None and rung[0].kind == "fit":
        raise QuantkitError(f"ladder rung '{name}': a fit budget needs the planner",
                            hint="use quantkit quantize --fit DEVICE, or a size rung such as gguf:size=300MB")
    return rung


def ladder_types(requested: list[str] | None = None) -> list[str]:
    """The rungs to build: REQUESTED (validated, canonical spellings) or the default ladder (F16,
    Q8_0, Q5_0, Q4_1, Q4_0 RTN, Q4_0 GPTQ, the K-quant mixes and the IQ rungs quantkit encodes)."""
    from ..quant.gguf_export import supported_file_types
    ok = supported_file_types()
    if not requested:
        return DEFAULT_LADDER + [t for t in LADDER_KQUANTS + LADDER_IQ if t in ok]
    out = []
    for t in requested:
        budget = _budget_rung(t)
        if budget is not None:
            from ..quant.budget import rung_spelling
            out.append(rung_spelling(*budget).removeprefix("gguf:"))
            continue
        try:
            r = parse_recipe(t)
        except QuantkitError as e:
            raise QuantkitError(f"unknown or unsupported ladder type: {e}") from None
        if r.format != "gguf" or r.type not in ok:
            raise QuantkitError(f"unknown or unsupported ladder type(s): {t}",
                                hint="choose from " + ", ".join(ok) + "; add +gptq for GPTQ, e.g. q4_0+gptq")
        if r.method == "gptq" and uses_imatrix(r.type):
            raise QuantkitError(f"ladder rung {t}: GPTQ onto IQ types is not available in a ladder",
                                hint=f"use {r.type} (round-to-nearest with an importance matrix)")
        if r.spelling(short=True) not in out:
            out.append(r.spelling(short=True))
    return out


@dataclass
class Rung:
    name: str            # "q4_0-gptq"
    file_type: str       # "q4_0"
    method: str          # "rtn" | "gptq"
    label: str           # "Q4_0 GPTQ"
    path: str
    seconds: float       # time to build it now (0 when re-used; the first IQ rung built includes its imatrix)
    reused: bool
    calibration: str | None = None   # GPTQ: "16 x 256 tokens of FILE"; IQ: "importance matrix ..."


@dataclass
class GPTQCalibration:
    """The ladder's calibration: GPTQ rungs solve on it, IQ rungs take an importance matrix
    computed from it, unless `imatrix` names an imatrix file (GGUF or .dat) to use instead."""
    text: str | None = None           # None: the shipped WikiText-2 valid excerpt (CALIB_TEXT)
    nsamples: int = DEFAULT_CALIB_SAMPLES
    seqlen: int = DEFAULT_CALIB_SEQLEN
    imatrix: str | None = None

    @property
    def path(self) -> str:
        return os.path.abspath(self.text) if self.text else CALIB_TEXT

    def check(self) -> None:
        if self.nsamples < 1 or self.seqlen < 2:
            raise QuantkitError(f"GPTQ calibration needs at least 1 sample of at least 2 tokens "
                                f"(got {self.nsamples} x {self.seqlen})", hint="--nsamples N --seqlen L")
        if not os.path.isfile(self.path):
            raise QuantkitError("no such calibration file", self.path, "give --calib FILE (any UTF-8 text)")

    def describe(self) -> str:
        return f"{self.nsamples} x {self.seqlen} tokens of {self.path}"

    def key(self) -> str:
        """What a cached GPTQ rung depends on besides the source and type: the text's bytes,
        nsamples, seqlen and the recipe's version."""
        h = hashlib.sha256(f"{sha256_file(self.path)}|{self.nsamples}|{self.seqlen}|v{GPTQ_RUNG_VERSION}".encode())
        return h.hexdigest()[:12]

    def check_imatrix(self) -> None:
        """IQ rungs: the given imatrix file exists, or the calibration to compute one is valid."""
        if self.imatrix is None:
            self.check()
        elif not os.path.isfile(self.imatrix):
            from ..models.imatrix_file import HOW_TO_MAKE
            raise QuantkitError("no such importance matrix file", self.imatrix, HOW_TO_MAKE)

    def imatrix_key(self) -> str:
        """What a cached IQ rung depends on besides the source and type: the given imatrix
        file's bytes, or the calibration its imatrix is computed from."""
        what = (f"file|{sha256_file(self.imatrix)}" if self.imatrix else
                f"{sha256_file(self.path)}|{self.nsamples}|{self.seqlen}|v{IMATRIX_VERSION}")
        return hashlib.sha256(what.encode()).hexdigest()[:12]

    def describe_imatrix(self) -> str:
        if self.imatrix:
            return f"importance matrix {os.path.abspath(self.imatrix)}"
        return f"importance matrix from {self.describe()}"


def ladder_imatrix(src_path: str, out_dir: str, cal: GPTQCalibration, reuse: bool, show_progress: bool):
    """The importance matrix of the IQ rungs (a models.imatrix_file.Imatrix): the file the
    calibration names, else computed with quant.imatrix from the calibration text and saved as
    out_dir/imatrix-KEY.gguf (re-used from quantkit's cache) or out_dir/imatrix.gguf."""
    from ..models.imatrix_file import read_imatrix, save_imatrix
    if cal.imatrix:
        return read_imatrix(cal.imatrix)
    path = os.path.join(out_dir, f"imatrix-{cal.imatrix_key()}.gguf" if reuse else "imatrix.gguf")
    if reuse and os.path.exists(path):
        eval_cache.touch(path, keep_mtime=True)
        return read_imatrix(path)
    from ..models.open import open_model
    from ..quant.imatrix import compute_imatrix
    if show_progress:
        print(f"importance matrix for the IQ rungs: {cal.describe()}", file=sys.stderr, flush=True)
    with open_model(src_path) as src:
        rep = compute_imatrix(src, src.path, calib=cal.path, nsamples=cal.nsamples, seqlen=cal.seqlen,
                              show_progress=show_progress)
    save_imatrix(rep.imatrix, path)
    return read_imatrix(path)


def build_rungs(model: str | None, types: list[str], out_dir: str | None = None, show_progress: bool = True,
                calibration: GPTQCalibration | None = None, stem: str | None = None) -> list[Rung]:
    """Quantize MODEL to each rung: RTN rungs with quantkit's own exporter (llama.cpp-exact), GPTQ
    rungs (name + "-gptq") with quant.gguf_gptq, calibrated as `calibration` says; IQ rungs with
    the exporter and an importance matrix (ladder_imatrix). In quantkit's cache (a folder per
    source digest; GPTQ and IQ rungs in a sub-folder per calibration or imatrix) an existing rung
    is re-used, so a rerun is instant; in a folder the user names, every rung is written
    afresh."""
    from ..models.bundled import bundled_path
    from ..models.open import open_model
    from ..quant.gguf_export import export_gguf
    from ..quant.gguf_gptq import export_gguf_gptq
    from ..quant.gptq import GPTQConfig
    src_path = os.path.abspath(os.fspath(model)) if model is not None else bundled_path()
    parsed = [parse_rung(t) for t in types]
    cal = calibration or GPTQCalibration()
    if any(m == "gptq" for _, m in parsed):
        cal.check()
    if any(uses_imatrix(ft) for ft, _ in parsed):
        cal.check_imatrix()
    reuse = out_dir is None
    if out_dir is None:
        out_dir = os.path.join(cache_root(), "ladder", model_digest(src_path)[:16])
    os.makedirs(out_dir, exist_ok=True)
    stem = stem or os.path.splitext(os.path.basename(os.path.normpath(src_path)))[0]
    rungs, imatrix = [], None
    for (ft, method) in parsed:
        name = ft + (GPTQ_SUFFIX if method == "gptq" else "")
        where = out_dir
        if reuse and method == "gptq":
            where = os.path.join(out_dir, f"gptq-{cal.key()}")
        elif reuse and uses_imatrix(ft):
            where = os.path.join(out_dir, f"imatrix-{cal.imatrix_key()}")
        out = os.path.join(where, f"{stem}-{name}.gguf")
        budget = _budget_rung(ft)
        if budget is not None:         # the mix depends on the calibration: one folder per calibration
            where = os.path.join(out_dir, f"gptq-{cal.key()}") if reuse else out_dir
            out = os.path.join(where, f"{stem}-{name}.gguf")
        reused = reuse and os.path.exists(out)
        t0 = time.perf_counter()
        if not reused:
            os.makedirs(where, exist_ok=True)
            if budget is not None:
                from ..quant.budget_export import export_budget
                export_budget(src_path, out, budget[0], method=method, calib=cal.path, nsamples=cal.nsamples,
                              seqlen=cal.seqlen, gptq=GPTQConfig(shrink=DEFAULT_SHRINK["gguf"]),
                              show_progress=show_progress)
            elif method == "gptq":
                if show_progress:
                    print(f"{rung_label(name)}: GPTQ on {cal.describe()}", file=sys.stderr, flush=True)
                export_gguf_gptq(src_path, out, ft, calib=cal.path, nsamples=cal.nsamples, seqlen=cal.seqlen,
                                 gptq=GPTQConfig(shrink=DEFAULT_SHRINK["gguf"]), show_progress=show_progress)
            else:
                if uses_imatrix(ft) and imatrix is None:
                    imatrix = ladder_imatrix(src_path, out_dir, cal, reuse, show_progress)
                with open_model(src_path) as src:
                    export_gguf(src, out, ft, show_progress=show_progress,
                                imatrix=imatrix if uses_imatrix(ft) else None)
        elif reuse:
            eval_cache.touch(out, keep_mtime=True)
        how = (cal.describe() if (method == "gptq" or budget is not None)
               else cal.describe_imatrix() if uses_imatrix(ft) else None)
        rungs.append(Rung(name, ft, method, rung_label(name), out, 0.0 if reused else time.perf_counter() - t0,
                          reused, how))
    return rungs


def build_ladder(model: str | None, types: list[str], out_dir: str | None = None,
                 show_progress: bool = True, calibration: GPTQCalibration | None = None) -> list[str]:
    """The rungs' paths (see build_rungs)."""
    return [r.path for r in build_rungs(model, types, out_dir, show_progress, calibration)]


def label_ladder(result: EvalResult, rungs: list[Rung], calibration: GPTQCalibration | None = None) -> EvalResult:
    """Mark each row with its rung (method shown: "Q4_0 RTN", "Q4_0 GPTQ") and state the GPTQ
    calibration in the result's meta."""
    by_path = {os.path.abspath(r.path): r for r in rungs}
    for row in result.rows:
        r = by_path.get(split_spec(row.path)[0])
        if r is not None:
            row.rung, row.method, row.file_type = r.label, r.method, r.file_type
            row.build_s, row.build_reused, row.calibration = r.seconds, r.reused, r.calibration
        elif row.rung is None:
            row.rung = "reference" if row.is_reference else "source"
    gptq = [r for r in rungs if r.method == "gptq"]
    iq = [r for r in rungs if r.method == "rtn" and uses_imatrix(r.file_type)]
    result.meta["ladder"] = {
        "rungs": [r.label for r in rungs],
        "rtn": "llama.cpp's round-to-nearest (quantkit's exporter, byte-exact with llama-quantize)",
        "gptq": (f"GPTQ onto the same llama.cpp types, calibrated on {gptq[0].calibration} "
                 f"(never the scored text)") if gptq else None,
        "imatrix": (f"IQ rungs weighted by an {iq[0].calibration} (as llama-quantize --imatrix)"
                    if iq else None),
        "reused": [r.label for r in rungs if r.reused],
    }
    return result
