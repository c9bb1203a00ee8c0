"""What the API's functions share: the trust_pickle keyword, opening a model, the result of a
quantize call, the recipe from keywords, Ray options."""

from __future__ import annotations

import functools
import inspect as _inspect
import os
from dataclasses import dataclass, field


def pickle_opt_in(fn):
    """Adds the keyword trust_pickle to `fn`: models.hf.trusting_pickle around the call (None, as
    when one API function calls another: as the enclosing call says; at the top, False)."""
    @functools.wraps(fn)
    def wrapper(*args, trust_pickle: bool | None = None, **kwargs):
        if trust_pickle is None:
            return fn(*args, **kwargs)
        from ..models.pickles import trusting_pickle
        with trusting_pickle(trust_pickle):
            return fn(*args, **kwargs)
    sig = _inspect.signature(fn)
    extra = _inspect.Parameter("trust_pickle", _inspect.Parameter.KEYWORD_ONLY, default=None, annotation="bool | None")
    params = list(sig.parameters.values())
    at = next((i for i, p in enumerate(params) if p.kind is _inspect.Parameter.VAR_KEYWORD), len(params))
    wrapper.__signature__ = sig.replace(parameters=[*params[:at], extra, *params[at:]])
    return wrapper


def open_model(path=None):
    """A ModelSource for a .gguf file, a Hugging Face directory, or (None) the bundled model."""
    from ..models.open import open_model as _open
    return _open(path)


@dataclass
class QuantizeResult:
    output: str
    format: str
    method: str
    seconds: float
    file_bytes: int
    types: dict[str, str] = field(default_factory=dict)
    mmproj: str | None = None        # the vision-language model's projector file, beside the output
    report: dict | None = None        # converted checkpoints: each tensor's path (quant.convert)


def with_mmproj(res: QuantizeResult, vis, mmproj_type: str, show_progress: bool) -> QuantizeResult:
    """Write the projector file of a vision-language model after its language model; if that
    fails, the language model's file goes too, so the pair is never left half made."""
    if vis is None:
        return res
    from ..quant.mmproj import write_mmproj
    src, path = vis
    try:
        rep = write_mmproj(src, path, mmproj_type, show_progress=show_progress)
    except BaseException:
        if os.path.isfile(res.output):
            os.remove(res.output)
        raise
    finally:
        src.close()
    res.mmproj = rep.path
    return res


def recipe_of(recipe, calibration=None, **flags):
    """A Recipe from `recipe` (a Recipe or a recipe string) or, when it is None, from loose
    keyword arguments (None: not given); never both."""
    from ..recipe import from_flags, parse_recipe
    from ..util.errors import QuantkitError
    if recipe is None:
        return from_flags(**flags, calibration=calibration)
    given = [k for k, v in flags.items() if v is not None]
    if given:
        raise QuantkitError(f"give a recipe or {', '.join(given)}, not both",
                            hint="put calibration and GPTQ options in the Recipe (recipe.from_flags)")
    return parse_recipe(recipe) if isinstance(recipe, str) else recipe


def ray_options(ray, workers):
    """quant.distributed.RayOptions from the API's `ray` (None/False: no Ray; True or "": a local
    runtime; an address) and `workers`; nothing imports Ray here."""
    from ..util.errors import QuantkitError
    if ray is None or ray is False:
        if workers is not None:
            raise QuantkitError("--workers needs --ray", hint="add --ray [ADDRESS]")
        return None
    from ..quant.distributed import RayOptions
    return RayOptions(address=None if ray is True else (ray or None), workers=2 if workers is None else workers)
