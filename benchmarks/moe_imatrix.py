"""quantkit imatrix on a mixture of experts against llama-imatrix: per-expert token counts and
sums of the *_exps tensors.

    nice .venv/bin/python benchmarks/moe_imatrix.py [--kinds qwen3moe,mixtral] [--chunks 8] [--ctx 128]

Per architecture a tiny random Hugging Face model (tests/helpers/tiny_models.build_arch_model,
2 layers, 4 experts, 2 per token) is converted to an F32 GGUF; llama-imatrix runs on that file
over wikitext-2 valid (-c CTX --chunks N), and quantkit's imatrix runs on the Hugging Face
directory over the same token chunks (llama-imatrix's: the text tokenized by llama.cpp, BOS
first in each chunk where the vocabulary adds one). Compared: entry names, per-expert counts, the sums' largest relative
difference. Routing is decided by float32 top-k in both, so a token whose two best experts nearly
tie may go to different experts on the two sides; the counts then differ by that token.
Writes benchmarks/results/moe_imatrix.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "src"))

import numpy as np  # noqa: E402

from quantkit import api  # noqa: E402
from quantkit.models.imatrix_file import read_imatrix  # noqa: E402
from quantkit.util.data import DATA_DIR  # noqa: E402
from helpers.tiny_models import build_arch_model  # noqa: E402

TOOLS = "/root/.cache/quantkit/llama-tools/bin"


def llama_chunks(f32: str, text_path: str, chunks: int, ctx: int) -> np.ndarray:
    """llama-imatrix's token ids: the text (one trailing newline dropped, as common's -f reader
    does) tokenized with the vocabulary's own add-BOS setting, cut into chunks of ctx tokens,
    each chunk's first token replaced by BOS where the vocabulary adds one (Qwen's does not)."""
    import llama_cpp
    llm = llama_cpp.Llama(model_path=f32, vocab_only=True, verbose=False)
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model)))
    text = Path(text_path).read_bytes()
    if text.endswith(b"\n"):
        text = text[:-1]
    toks = np.array(llm.tokenize(text, add_bos=add_bos, special=False), dtype=np.int64)
    ids = toks[: chunks * ctx].reshape(chunks, ctx).copy()
    if add_bos:
        ids[:, 0] = llm.token_bos()
    return ids


def _one(kind: str, root: Path, chunks: int, ctx: int) -> dict:
    d = build_arch_model(kind, root, layers=2)
    f32 = str(root / f"{kind}-f32.gguf")
    api.quantize(str(d), f32, format="gguf:f32", show_progress=False)
    valid = os.path.join(DATA_DIR, "wikitext-2", "valid.txt")
    theirs, ours = str(root / f"{kind}-llama.gguf"), str(root / f"{kind}-quantkit.gguf")
    subprocess.run([os.path.join(TOOLS, "llama-imatrix"), "-m", f32, "-f", valid, "-c", str(ctx), "--chunks",
                    str(chunks), "-o", theirs, "-t", "1"], check=True, capture_output=True)
    api.imatrix(str(d), ours, input_ids=llama_chunks(f32, valid, chunks, ctx), show_progress=False)
    a, b = read_imatrix(ours), read_imatrix(theirs)
    out = {"kind": kind, "chunks": chunks, "ctx": ctx, "names_equal": sorted(a.entries) == sorted(b.entries),
           "experts": {}}
    for n in sorted(x for x in a.entries if "_exps" in x):
        x, y = a.entries[n], b.entries[n]
        rel = float(np.abs(x.sums.astype(np.float64) - y.sums).max() / np.abs(y.sums).max())
        out["experts"][n] = {"quantkit_counts": x.counts.tolist(), "llama_counts": y.counts.tolist(),
                             "sums_max_rel_diff": rel}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", default="qwen3moe,mixtral")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=128)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds.split(","):
            r = _one(kind, Path(tmp), args.chunks, args.ctx)
            rows.append(r)
            print(json.dumps(r), flush=True)
    res = HERE / "results" / "moe_imatrix.json"
    res.write_text(json.dumps({"rows": rows, "load_avg": os.getloadavg()}, indent=1))
    for r in rows:
        same = sum(e["quantkit_counts"] == e["llama_counts"] for e in r["experts"].values())
        worst = max(e["sums_max_rel_diff"] for e in r["experts"].values())
        print(f"{r['kind']}: names equal {r['names_equal']}; per-expert counts equal in {same} of "
              f"{len(r['experts'])} expert tensors; sums max rel. diff {worst:.2e}")


if __name__ == "__main__":
    main()
