"""Pickles only when asked.

A pytorch_model*.bin file is a pickle: loading it can run code (torch.load(weights_only=True)
restricts what it unpickles, but the promise is that no pickle is read unasked). A Hugging Face
directory whose weights are pickles is read only inside `trusting_pickle()` (the CLI's
--trust-pickle, the API's trust_pickle=True) or when its reader is told so; otherwise it is
refused in one line that says how to convert the file to safetensors.
"""

from __future__ import annotations

import contextlib
import contextvars
import glob
import json
import os

from ..util.errors import QuantkitError

_TRUST_PICKLE: contextvars.ContextVar[bool] = contextvars.ContextVar("quantkit_trust_pickle", default=False)


@contextlib.contextmanager
def trusting_pickle(trust: bool = True):
    """Within the block, HF directories whose weights are pytorch_model*.bin (pickles) are read
    (with torch.load(weights_only=True)); outside it, or with trust=False, they are refused."""
    token = _TRUST_PICKLE.set(bool(trust))
    try:
        yield
    finally:
        _TRUST_PICKLE.reset(token)


def pickle_weights(path: str | os.PathLike) -> list[str]:
    """The pickle files (pytorch_model*.bin) a model directory's weights would be read from;
    [] when it has safetensors weights (read instead) or is not a directory."""
    d = os.fspath(path)
    if not os.path.isdir(d) or os.path.isfile(os.path.join(d, "model.safetensors.index.json")):
        return []
    bin_index = os.path.join(d, "pytorch_model.bin.index.json")
    if os.path.isfile(bin_index):
        try:
            with open(bin_index, encoding="utf-8") as f:
                return sorted({os.path.join(d, fn) for fn in json.load(f)["weight_map"].values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return []                           # unreadable: HFSource names what is wrong
    if glob.glob(os.path.join(d, "*.safetensors")):
        return []
    return sorted(glob.glob(os.path.join(d, "pytorch_model*.bin")))


def require_trusted(path: str | os.PathLike, trust: bool | None = None, files: list[str] | None = None) -> None:
    """Refuse a model directory whose weights are pickles (`files`, else pickle_weights(path))
    unless trusted (`trust`, else the enclosing trusting_pickle())."""
    files = pickle_weights(path) if files is None else files
    if not files or (_TRUST_PICKLE.get() if trust is None else trust):
        return
    fn = files[0]
    out = os.path.join(os.path.dirname(fn), "model.safetensors")
    raise QuantkitError(
        "weights are a pickle (PyTorch .bin), which quantkit reads only when asked", fn,
        "pass --trust-pickle (API: trust_pickle=True) to load it with torch.load(weights_only=True), or convert it "
        "once to safetensors: python -c \"import torch; from safetensors.torch import save_file; "
        f"sd = torch.load({fn!r}, weights_only=True); "
        f"save_file({{k: v.contiguous().clone() for k, v in sd.items()}}, {out!r})\" and move the .bin away")
