"""The options of one `quantkit eval` run (language models and classifiers alike)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EvalOptions:
    ref: str | None = None          # None: the F32 dequantization of the first model
    text: str | None = None         # None: QUANTKIT_EVAL_TEXT or the wikitext-2 test split
    n_chunks: int = 8               # 0: every full chunk of the text (llama.cpp's default)
    n_ctx: int = 512
    n_threads: int | None = None    # None: all cores
    speed: bool = True              # load / prompt / generation / peak RSS, in a subprocess
    speed_runs: int = 3
    n_prompt: int = 128
    n_gen: int = 32
    cache: bool = True              # keep reference log-probabilities between runs
    cache_max: int | str | None = None  # cap of the eval cache (bytes or "4G"); None: $QUANTKIT_EVAL_CACHE_MAX or 4 GiB
    task_data: str | None = None    # classifiers: label<TAB>text file; None: $QUANTKIT_EVAL_TASK_DATA or SST-2 dev
    task_limit: int | None = None   # classifiers: score the first N examples only
    batch_size: int = 32            # classifiers: sentences per forward pass
    show_progress: bool = True
