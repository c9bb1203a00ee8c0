"""The API's writers: quantize (GGUF, budgets, conversions), imatrix, quantize_gpu."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .common import QuantizeResult, open_model, pickle_opt_in, ray_options, recipe_of, with_mmproj


@pickle_opt_in
def quantize(model=None, output: str | os.PathLike | None = None, *, format: str | None = None,  # noqa: A002
             method: str | None = None, pure: bool = False, token_embedding_type: str | None = None,
             output_tensor_type: str | None = None, calib: str | None = None, nsamples: int | None = None,
             seqlen: int | None = None, damp: float | None = None, act_order: bool | None = None,
             scale_search: bool | None = None, true_sequential: bool | None = None, shrink: float | None = None,
             recipe=None, show_progress: bool = True, ray: bool | str | None = None,
             workers: int | None = None, mmproj: str | os.PathLike | None = None, mmproj_type: str = "f16",
             text_only: bool = False, imatrix: str | os.PathLike | None = None,
             target_bpw: float | None = None, target_size: str | int | None = None,
             fit: str | None = None, ctx: int | None = None, kv_type: str | None = None,
             runtime: str | None = None, types: list[str] | None = None, evaluate: bool = False, command: str | None = None, exact: bool = False,
             qat: bool = False, save_imatrix: str | os.PathLike | None = None) -> QuantizeResult:
    """Quantize MODEL and write OUTPUT, a GGUF file. What to make is a recipe (quantkit.recipe):
    `recipe` (a Recipe, or a string such as "gguf:q4_0+gptq"), or `format` ("gguf:<file type>":
    f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0, q6_k and the K-quant mixes; default gguf:q4_0)
    with `method` and the calibration / GPTQ keywords. Method "rtn" is llama.cpp's own
    round-to-nearest, byte for byte; "gptq" solves every decoder linear onto the same llama.cpp
    type with GPTQ (calibrated on `calib`, nsamples x seqlen tokens; defaults in quantkit.recipe:
    wikitext-2 valid, 128 x 512) and writes every other tensor as "rtn" does: the same file
    layout and size, a lower error. `shrink` (GPTQ): the Hessian moved toward its diagonal by
    this fraction; None: recipe.DEFAULT_SHRINK (0.1 on these grids). `ray` (GPTQ): split the
    calibration over `workers` Ray workers (default 2), on the cluster at the address `ray`
    names or, with ray=True, a local runtime (see quant.distributed).

    A vision-language directory (LLaVA, Gemma-3 with its vision tower): the language model becomes
    OUTPUT and the vision tower and projector llama.cpp's multimodal projector file, at `mmproj`
    (default: mmproj-<OUTPUT's name> beside it) in `mmproj_type` (f16, q8_0 or f32);
    text_only=True writes the language model alone; the result's `mmproj` names the projector file.

    `imatrix`: an importance matrix file (GGUF or legacy .dat, from `imatrix()` or llama-imatrix)
    for round-to-nearest: the same bytes as `llama-quantize --imatrix`; the types that need one
    (IQ2/IQ1, Q2_K_S) are refused without it. `save_imatrix` (GPTQ only): also write the
    importance matrix of the inputs GPTQ calibrated on, in llama.cpp's format (GGUF, or legacy
    for a .dat name); block 0's q/k/v entries (all of block 0's with true_sequential=False)
    equal `imatrix()` on the same tokens, later ones follow the already-quantized linears.

    A budget (`target_bpw` bits per weight over the file, `target_size` bytes such as "2.5GB", or
    `fit` a device name with `ctx`, `kv_type` and `runtime`; see quantize_budget) chooses a type per tensor
    instead of the file type's mix, and writes a model card beside the file.

    A GPU format ("gptq:w4g128", "compressed-tensors:w4g128-asym+gptq", ...) writes that checkpoint
    directory through quantize_gpu(), as `quantkit quantize` does, and returns its result
    (quant.checkpoint.GPUExportResult); the GGUF-only keywords are refused with it. As with a
    GGUF format, the method is round-to-nearest unless `method` or the format string says gptq
    (quantize_gpu's own default is gptq)."""
    from ..quant.gguf_export import export_gguf, supported_file_types
    from ..util.errors import QuantkitError
    if output is None:
        raise QuantkitError("no output path", hint="give -o OUT")
    from ..quant.budget import budget_from_flags
    budget = budget_from_flags(target_bpw, target_size, fit, ctx, kv_type, runtime)
    if budget is None and types is not None:
        raise QuantkitError("types= lists a budget's candidate types", hint="add target_size, target_bpw or fit")
    if budget is not None:
        if imatrix is not None or mmproj is not None:
            raise QuantkitError("a budget chooses its own types from its calibration; --imatrix and --mmproj "
                                "are not combined with it", hint="leave out --imatrix / --mmproj, or the budget")
        return quantize_budget(model, output, budget, format=format, method=method, calib=calib, nsamples=nsamples,
                               seqlen=seqlen, damp=damp, act_order=act_order, scale_search=scale_search,
                               true_sequential=true_sequential, shrink=shrink, recipe=recipe,
                               show_progress=show_progress, ray=ray, workers=workers, evaluate=evaluate,
                               command=command, types=types)
    if save_imatrix is not None and (budget is not None or method == "rtn"):
        raise QuantkitError("save_imatrix collects the inputs of a GGUF GPTQ run onto one file type",
                            os.fspath(save_imatrix), "use method='gptq' without a budget, or imatrix()")
    if evaluate:
        raise QuantkitError("--eval scores a budgeted file for its model card", hint="add --target-size, --target-bpw or --fit")
    r = recipe_of(recipe, format=format, method=method, calib=calib, nsamples=nsamples, seqlen=seqlen, damp=damp,
                act_order=act_order, scale_search=scale_search, true_sequential=true_sequential, shrink=shrink)
    if r.format in ("gptq", "compressed-tensors"):       # as the CLI's quantize: the GPU checkpoint writer
        given = [k for k, v in (("pure", pure), ("token_embedding_type", token_embedding_type),
                                ("output_tensor_type", output_tensor_type), ("mmproj", mmproj),
                                ("text_only", text_only), ("imatrix", imatrix), ("qat", qat),
                                ("exact", exact), ("save_imatrix", save_imatrix)) if v]
        if given:
            raise QuantkitError(f"{', '.join(given)} apply to GGUF files, not to a {r.format} checkpoint",
                                hint="leave them out, or use a gguf: format")
        return quantize_gpu(model, output, recipe=r, show_progress=show_progress, ray=ray, workers=workers)
    from ..util.atomic import check_output
    check_output(output, [model, r.calibration.file], directory=r.format == "hf")
    if save_imatrix is not None:
        if r.format != "gguf" or r.method != "gptq":
            raise QuantkitError("save_imatrix collects the inputs of a GGUF GPTQ run", os.fspath(save_imatrix),
                                f"use a gguf:TYPE+gptq recipe, or imatrix() (got {r.spelling()})")
        if os.path.abspath(os.fspath(save_imatrix)) == os.path.abspath(os.fspath(output)):
            raise QuantkitError("the importance matrix and the GGUF would be the same file", os.fspath(save_imatrix),
                                "give --save-imatrix another name")
        check_output(save_imatrix, [model, r.calibration.file, output], flag="--save-imatrix")
    fmt = r.spelling().split("+")[0]
    if r.format == "hf":
        if exact or qat:
            raise QuantkitError(f"--{'exact' if exact else 'qat'} does not apply to --format hf (float weights)",
                                hint="leave it out")
        return _to_hf(model, output, r, show_progress)
    from ..models.quantized_source import is_quantized_dir
    if model is not None and r.format == "gguf" and is_quantized_dir(os.fspath(model)):
        if qat:
            raise QuantkitError("--qat reads float weights; this checkpoint is already quantized", model,
                                "leave out --qat: its grid is converted as it is where the type allows")
        return _convert(model, output, r, exact, pure, token_embedding_type, output_tensor_type, show_progress)
    if exact:
        raise QuantkitError("--exact applies to a quantized checkpoint as MODEL (GPTQ, AWQ, compressed-tensors)",
                            hint="leave out --exact")
    if qat and (r.format != "gguf" or r.method != "rtn"):
        raise QuantkitError(f"--qat keeps the Q4_0 blocks of a GGUF by their own scales; {r.spelling()} has none",
                            hint="use --format gguf:q4_0 (without +gptq)")
    if r.format != "gguf":
        raise QuantkitError(f"format '{r.spelling()}' is written by quantize_dynamic()",
                            hint="call quantkit.api.quantize_dynamic")
    from ..quant.gguf_policy import FILE_TYPES, requires_imatrix
    if imatrix is None and r.method != "gptq" and r.type in FILE_TYPES \
            and requires_imatrix("", FILE_TYPES[r.type][1], r.type):
        from ..models.imatrix_file import HOW_TO_MAKE
        raise QuantkitError(f"file type {r.type} needs an importance matrix (llama.cpp refuses it without one)",
                            hint=f"{HOW_TO_MAKE}, then pass --imatrix imatrix.gguf")
    if r.type not in supported_file_types():
        default = FILE_TYPES[r.type][1] if r.type in FILE_TYPES else r.type
        raise QuantkitError(f"type '{r.type}' cannot be encoded here (quantkit has no {default} encoder in this build)",
                            hint="use one of " + ", ".join(supported_file_types()))
    from ..quant.mmproj import prepare_mmproj
    vis = prepare_mmproj(model, output, mmproj, mmproj_type, text_only)   # vision-language: the projector file
    if imatrix is not None and r.method == "gptq":
        raise QuantkitError("--imatrix weights round-to-nearest export; GPTQ calibrates on its own data",
                            os.fspath(imatrix), "leave out +gptq, or leave out --imatrix")
    if r.method == "gptq":
        from ..quant.gguf_gptq import export_gguf_gptq
        from ..quant.gptq import GPTQConfig
        g = r.gptq
        cfg = GPTQConfig(damp=g.damp, act_order=g.act_order, scale_search=g.scale_search, shrink=r.shrink)
        cal = r.calibration
        rep = export_gguf_gptq(model, output, r.type, calib=cal.file, nsamples=cal.nsamples, seqlen=cal.seqlen,
                               gptq=cfg, true_sequential=g.true_sequential, pure=pure,
                               token_embedding_type=token_embedding_type, output_tensor_type=output_tensor_type,
                               show_progress=show_progress, ray=ray_options(ray, workers), save_imatrix=save_imatrix)
        return with_mmproj(QuantizeResult(rep.path, fmt, r.method, rep.seconds, rep.n_bytes, rep.types,
                                          report={"experts": rep.experts} if rep.experts else None),
                           vis, mmproj_type, show_progress)
    if ray not in (None, False):
        raise QuantkitError("--ray spreads GPTQ's calibration over workers; round to nearest needs none",
                            hint="leave out --ray, or add +gptq to the format")
    imx = None
    if imatrix is not None:
        from ..models.imatrix_file import read_imatrix
        imx = read_imatrix(imatrix)
    src = open_model(model)
    try:
        if qat:
            from ..quant.qat import export_qat
            rep = export_qat(src, output, r.type, pure=pure, token_embedding_type=token_embedding_type,
                             output_tensor_type=output_tensor_type, show_progress=show_progress)
            return QuantizeResult(rep.path, fmt, "qat", rep.seconds, rep.n_bytes, rep.types,
                          report=rep.to_dict())
        rep = export_gguf(src, output, r.type, pure=pure, token_embedding_type=token_embedding_type,
                          output_tensor_type=output_tensor_type, show_progress=show_progress, imatrix=imx)
    finally:
        src.close()
    return with_mmproj(QuantizeResult(rep.path, fmt, r.method, rep.seconds, rep.n_bytes, rep.types),
                        vis, mmproj_type, show_progress)


@dataclass
class ImatrixResult:
    output: str
    seconds: float
    tokens: int
    entries: int


@pickle_opt_in
def imatrix(model=None, output: str | os.PathLike | None = None, *, calib: str | None = None,
            nsamples: int | None = None, seqlen: int | None = None, input_ids=None,
            show_progress: bool = True) -> ImatrixResult:
    """Compute MODEL's importance matrix (what llama-imatrix computes: per decoder weight, the sum
    over calibration tokens of each input column's squared activation, and the token count)
    with quantkit's forward over `calib` (default wikitext-2 valid), nsamples x seqlen tokens
    (defaults in quantkit.recipe), or over `input_ids` [chunks, tokens] as given; write it to
    OUTPUT: llama.cpp's GGUF imatrix, or the legacy format for a name ending in .dat. Use it
    with quantize(..., imatrix=OUTPUT) or llama-quantize --imatrix."""
    from .. import recipe as rc
    from ..models.imatrix_file import save_imatrix
    from ..quant.imatrix import compute_imatrix
    from ..util.atomic import check_output
    from ..util.errors import QuantkitError
    if output is None:
        raise QuantkitError("no output path", hint="give -o imatrix.gguf")
    check_output(output, [model, calib])
    n = rc.check_nsamples(nsamples) if nsamples is not None else rc.DEFAULT_NSAMPLES
    L = rc.check_seqlen(seqlen) if seqlen is not None else rc.DEFAULT_SEQLEN
    if input_ids is not None:
        import torch
        input_ids = torch.as_tensor(input_ids, dtype=torch.long)
    src = open_model(model)
    try:
        rep = compute_imatrix(src, src.path, calib=calib, nsamples=n, seqlen=L, input_ids=input_ids,
                              show_progress=show_progress)
    finally:
        src.close()
    save_imatrix(rep.imatrix, output)
    return ImatrixResult(os.fspath(output), rep.seconds, rep.tokens, len(rep.imatrix.entries))


def _convert(model, output, r, exact, pure, token_embedding_type, output_tensor_type, show_progress):
    """A quantized checkpoint directory -> GGUF (quant.convert)."""
    from ..quant.convert import convert_to_gguf
    from ..quant.gptq import GPTQConfig
    g, cal = r.gptq, r.calibration
    cfg = GPTQConfig(damp=g.damp, act_order=g.act_order, scale_search=g.scale_search, shrink=r.shrink)
    rep = convert_to_gguf(model, output, r.type, exact=exact, calib=cal.file, nsamples=cal.nsamples,
                          seqlen=cal.seqlen, gptq=cfg, true_sequential=g.true_sequential, pure=pure,
                          token_embedding_type=token_embedding_type, output_tensor_type=output_tensor_type,
                          show_progress=show_progress)
    return QuantizeResult(rep.path, f"gguf:{r.type}", "convert", rep.seconds, rep.n_bytes, rep.types,
                          report=rep.to_dict())


def _to_hf(model, output, r, show_progress):
    """A GGUF -> Hugging Face checkpoint directory (models.hf_export)."""
    from ..models.hf_export import export_hf
    from ..util.errors import QuantkitError
    if model is None:
        from ..models.bundled import bundled_path
        model = bundled_path()
    if os.path.isdir(os.fspath(model)):
        raise QuantkitError("--format hf converts a GGUF file", model, "give a .gguf file as MODEL")
    rep = export_hf(os.fspath(model), os.fspath(output), r.type, show_progress=show_progress)
    return QuantizeResult(rep.path, r.spelling(), "convert", rep.seconds, rep.n_bytes, rep.types,
                          report=rep.to_dict())


@pickle_opt_in
def quantize_gpu(model, output: str | os.PathLike, *, format: str | None = None,  # noqa: A002
                 method: str | None = None, bits: int | None = None, group_size: int | None = None,
                 sym: bool | None = None, act_order: bool | None = None, calib: str | None = None,
                 nsamples: int | None = None, seqlen: int | None = None, damp: float | None = None,
                 shrink: float | None = None, scale_search: bool | None = None,
                 true_sequential: bool | None = None, recipe=None, show_progress: bool = True,
                 ray: bool | str | None = None, workers: int | None = None):
    """Quantize the decoder linears of a causal LM (a Hugging Face directory or a GGUF file; None:
    the bundled Gemma-3-270M) with RTN or GPTQ and write a GPTQ ("gptq") or compressed-tensors
    ("compressed-tensors", pack-quantized) checkpoint directory. What to make is `recipe` (a
    Recipe or a string such as "compressed-tensors:w4g128-asym+gptq") or the keywords: `format`
    (default compressed-tensors; it may carry the spec, "gptq:w4g128"), `method` (default gptq
    unless the format string says +rtn or +gptq), bits 4, group_size 128, sym; every default
    in quantkit.recipe (calibration 128 x 512, damp 0.01, shrink 0 for these formats). GPTQ calibrates on `calib` (any
    UTF-8 text; default wikitext-2 valid), `nsamples` x `seqlen` tokens from the model's own
    tokenizer; each group's scale (and zero) comes from a search weighted by GPTQ's column
    importance unless `scale_search` is False (then the group's min/max, as RTN); with
    `true_sequential` (default) a block's linears are calibrated in turn (attention, o, MLP
    gate/up, down) on the outputs of those already quantized, else all on the block's float
    inputs. `ray`, `workers`: as in quantize(). Returns quant.checkpoint.GPUExportResult."""
    from ..models.gpu_formats import GPUFormatConfig
    from ..quant.checkpoint import export_gpu_checkpoint
    from ..util.errors import QuantkitError
    if recipe is None:
        format = format or "compressed-tensors"  # noqa: A001
        if method is None and "+" not in format:
            method = "gptq"
    r = recipe_of(recipe, format=format, method=method, bits=bits, group_size=group_size, sym=sym,
                act_order=act_order, calib=calib, nsamples=nsamples, seqlen=seqlen, damp=damp, shrink=shrink,
                scale_search=scale_search, true_sequential=true_sequential)
    if r.format not in ("gptq", "compressed-tensors"):
        raise QuantkitError(f"format '{r.spelling()}' is not a GPU checkpoint",
                            hint="gptq or compressed-tensors; GGUF files come from quantize()")
    if model is None:
        from ..models.bundled import bundled_path
        model = bundled_path()
    from ..util.atomic import check_output
    check_output(output, [model, r.calibration.file], directory=True)
    g, cal = r.gptq, r.calibration
    cfg = GPUFormatConfig(r.format, r.bits, r.group_size, r.sym, g.act_order, r.method, g.damp, g.scale_search,
                          g.true_sequential)
    return export_gpu_checkpoint(os.fspath(model), os.fspath(output), cfg, calib=cal.file, nsamples=cal.nsamples,
                                 seqlen=cal.seqlen, shrink=r.shrink, show_progress=show_progress,
                                 ray=ray_options(ray, workers))


@pickle_opt_in
def quantize_budget(model=None, output: str | os.PathLike | None = None, budget=None, *,
                    format: str | None = None, method: str | None = None,  # noqa: A002
                    calib: str | None = None, nsamples: int | None = None, seqlen: int | None = None,
                    damp: float | None = None, act_order: bool | None = None, scale_search: bool | None = None,
                    true_sequential: bool | None = None, shrink: float | None = None, recipe=None,
                    show_progress: bool = True, ray=None, workers=None, evaluate: bool = False,
                    command: str | None = None, card: bool = True, types: list[str] | None = None) -> QuantizeResult:
    """A GGUF of MODEL under a budget: `budget` a quant.budget.Budget (budget_from_flags) or a
    rung string ("gguf:bpw4.5+gptq", "gguf:size=300MB", "gguf:fit=rtx-3060@8192"). Per tensor,
    every type quantkit encodes is priced by quant.sensitivity (estimated KL divergence, from a
    calibration pass of min(nsamples, 16) x seqlen tokens, cached) and quant.allocate picks the
    least-cost mix that fits; method "gptq" then solves each decoder linear onto its own type's
    grid (calibration as in quantize). Writes OUTPUT (never over the budget) and, with `card`,
    a model card README.md beside it (`evaluate`: with the KL divergence and perplexity measured
    on wikitext-2 test). Raises one QuantkitError for a budget no mix meets (naming the smallest
    file), an unknown device, a --fit context that leaves too little (naming one that fits).
    `types`: the candidate types the allocation chooses from (default: every type quantkit
    encodes without an importance matrix). A fit budget's `runtime` (llama-cpp-python or
    llama-server) is the front end whose memory the planner leaves room for."""
    from ..quant.budget import resolve_budget
    from ..quant.budget_export import export_budget
    from ..quant.gptq import GPTQConfig
    from ..recipe import parse_recipe
    from ..util.atomic import check_output
    from ..util.errors import QuantkitError
    if output is None:
        raise QuantkitError("no output path", hint="give -o OUT")
    budget, method = resolve_budget(budget, format, method)
    if recipe is not None and method is not None:
        given = parse_recipe(recipe) if isinstance(recipe, str) else recipe
        if given.method != method:
            raise QuantkitError(f"the recipe's method {given.method} contradicts +{method}", hint="say the method once")
        method = None
    r = recipe_of(recipe, format=None, method=method, calib=calib, nsamples=nsamples, seqlen=seqlen, damp=damp,
                act_order=act_order, scale_search=scale_search, true_sequential=true_sequential, shrink=shrink)
    if r.format != "gguf":
        raise QuantkitError("a budget writes a GGUF", hint="leave --format out")
    check_output(output, [model, r.calibration.file])
    output, cal, g = os.fspath(output), r.calibration, r.gptq

    def fit_resolver(path, smallest):
        from ..plan.fit import check_fit
        return check_fit(path, budget.device, budget.n_ctx, budget.kv_type, smallest, runtime=budget.runtime)

    rep = export_budget(model, output, budget, method=r.method, calib=cal.file, nsamples=cal.nsamples,
                        seqlen=cal.seqlen, gptq=GPTQConfig(damp=g.damp, act_order=g.act_order,
                                                           scale_search=g.scale_search, shrink=r.shrink),
                        true_sequential=g.true_sequential, show_progress=show_progress,
                        ray=ray_options(ray, workers), fit_resolver=fit_resolver, types=types)
    res = QuantizeResult(output, f"gguf:{budget.spelling()}", r.method, rep.seconds["total"], rep.file_bytes,
                         rep.mix.types)
    path, sens, mix, fit, seconds = rep.source, rep.sens, rep.mix, rep.fit, rep.seconds
    if card:
        _budget_card(path, res, budget, r, sens, mix, fit, evaluate, command, seconds)
    return res


def _budget_card(model_path, res, budget, r, sens, mix, fit, evaluate, command, seconds):
    """The model card beside a budgeted file (eval.model_card), with the planner's numbers for
    a --fit device."""
    from ..eval.model_card import budget_card
    planner = None
    if fit is not None:
        from ..plan.planner import PlanOptions, plan
        p = plan(res.output, PlanOptions(devices=[fit.device], n_ctx=fit.n_ctx, kv_type=fit.kv_type,
                                         runtime=fit.runtime))
        row = p.rows[0]
        cell, inf = row.cells[0], row.memory
        # on a CPU the planner's figure is the process's peak RSS (memory.cpu_resident), which the
        # --fit budget was cut from; elsewhere the device memory the allocation needs
        from ..plan import hardware
        on_cpu = hardware.device(fit.device).kind == "cpu"
        needed = row.cpu_resident if on_cpu and row.cpu_resident else cell.memory_needed
        planner = {"device": fit.device, "n_ctx": fit.n_ctx, "kv_type": fit.kv_type, "runtime": fit.runtime,
                   "needed": needed,
                   "available": cell.memory_available, "kv": inf.kv,
                   "decode": f"{cell.decode_expected:.1f} tokens/s" if cell.decode_expected else None}
    scores = None
    if evaluate:
        from ..eval.evaluate import EvalOptions, evaluate as evaluate_models
        er = evaluate_models([model_path, res.output], EvalOptions(speed=False, show_progress=False))
        row = er.rows[-1]
        scores = [{"text": "wikitext-2 test", "kld": row.kld_mean, "ppl": row.ppl, "top1": row.top1_agreement}]
    return budget_card(model_path, res.output, budget, r, sens, mix, planner, scores, command, seconds)
