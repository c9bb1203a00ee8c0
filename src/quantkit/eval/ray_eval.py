"""`quantkit eval --ray [ADDRESS]`: the cells of an evaluation (quantize a rung, score it) as Ray
tasks, with the same numbers, table, JSON and report as a local run.

A job is one source model on one text: the models given and the rungs (recipes) made from the
first. The driver tokenizes once and picks the reference as a local run does; the reference pass
is one task, and its log-probabilities travel to the cells through Ray's object store encoded by
eval.logprob_codec (2 bytes an entry, llama-perplexity's grid, exact top entries; the KL error
bound it adds is reported in the meta), and are kept in quantkit's cache under the same key as
the local run's float32 files. Every other model and every rung is one task with its CPU and
memory needs declared (num_cpus = the threads it runs, memory from the model's size and the
chunk's vocabulary rows). Tasks are retried by Ray when their worker dies (max_retries); a
finished cell is kept in quantkit's cache, keyed by the reference's chunks, the source, the recipe
and its calibration, so an interrupted run resumes where it stopped. Ctrl-C cancels the tasks
(ray.cancel), waits for them to unwind, and removes what this run had half-written.

Ray is imported only here, and only by a run given --ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ..runtimes import normalize_spec, open_runtime, ray_cluster, split_spec
from ..util.atomic import atomic_output
from ..util.errors import QuantkitError
from ..util.machine import machine_info
from . import cache as eval_cache
from . import logprob_codec as codec
from . import metrics
from .cache import cache_root, model_digest
from .facts import ModelFacts, describe
from .ladder import GPTQCalibration, Rung, build_rungs, label_ladder, parse_rung
from .lm import Chunks, default_text, lm_meta, pick_reference, read_text, reference_files, tokenize_chunks
from .options import EvalOptions
from .results import EvalResult, ModelRow, model_labels
from .speed import run_probe

MAX_RETRIES = 3
CELL_VERSION = "1"       # bump when what a cell computes changes: cached cells are recomputed
LOCAL = "local"          # --ray without an address: a local runtime


@dataclass
class Job:
    """One section: MODELS (normalized specs; the first is the source of the rungs) scored on
    TEXT, with RECIPES quantized from the first (into out_dir, else quantkit's cache)."""
    models: list[str]
    recipes: list[str] = field(default_factory=list)
    text: str | None = None
    out_dir: str | None = None
    calibration: GPTQCalibration = field(default_factory=GPTQCalibration)


@dataclass
class CellResult:
    row: ModelRow
    facts: ModelFacts
    rung: Rung | None
    kld_bound: float


class Cluster:
    """A connection to Ray for one run: a local runtime of `workers` CPUs (loopback, no
    dashboard) when address is None or "local", else the cluster at address; where the process
    has already called ray.init(), that connection, kept open after the run."""

    def __init__(self, address: str | None, workers: int | None):
        self.address = None if address in (None, LOCAL) else address
        if self.address:
            ray_cluster.check_address(self.address)
        self.workers = workers
        self.ray = ray_cluster.import_ray()

    def __enter__(self):
        # Ray's driver prints its cluster notices (a worker that died, a retry) on stdout: they go
        # to stderr, so that stdout holds only the results (--json stays parseable)
        self._stdout = contextlib.redirect_stdout(sys.stderr)
        self._stdout.__enter__()
        self.owned = ray_cluster.connect(self.address, self.workers or max(1, os.cpu_count() or 1),
                                         configure_logging=False)
        return self

    def __exit__(self, *exc):
        try:
            if self.owned:
                self.ray.shutdown()
        finally:
            self._stdout.__exit__(*exc)
        return False

    def task(self, fn, num_cpus: int, memory: int):
        check_fits(memory, self.ray.nodes())
        return self.ray.remote(num_cpus=num_cpus, memory=max(int(memory), 1 << 20), max_retries=MAX_RETRIES,
                               retry_exceptions=False)(fn)


def check_fits(need: int, nodes: list[dict]) -> None:
    """A task that no node of the cluster could hold would wait for ever: refuse it, saying how
    much it needs. nodes: ray.nodes()."""
    have = [n.get("Resources", {}).get("memory", 0) for n in nodes if n.get("Alive", True)]
    if have and need > max(have):
        raise QuantkitError(f"a task needs {need / 2**30:.2f} GiB of memory; the largest Ray node offers "
                            f"{max(have) / 2**30:.2f} GiB", hint="add a node with more memory, or evaluate a "
                            "smaller model or fewer --ctx tokens")


def _readable(spec: str) -> None:
    """In a task: the model must be on a path this worker reads (a shared or copied folder)."""
    path = split_spec(spec)[0]
    if not os.access(path, os.R_OK):
        raise QuantkitError(f"Ray worker {socket.gethostname()} (pid {os.getpid()}) cannot read the model", path,
                            "put models where every node reads them at the same path")


# ------------------------------------------------------------------------------- tasks
def reference_task(ref_path: str, ids: list[list[int]], first: int, n_ctx: int, n_threads: int):
    """The reference's log-softmax of each chunk's scored rows, encoded; and its load time (two
    objects, so the cells receive the chunks alone)."""
    _readable(ref_path)
    rt = open_runtime(ref_path, n_ctx, n_threads)
    try:
        out = []
        for c in ids:
            logits = rt.scored_logits(c, first)
            lp = metrics.np.empty(logits.shape, dtype=metrics.np.float32)
            metrics.log_softmax_into(logits, lp)
            out.append(codec.encode(lp, c[first + 1:]))
            del logits, lp
        return out, rt.load_s
    finally:
        rt.close()


def cell_task(spec: str | None, recipe: str | None, job: Job, refs: list[dict], ids: list[list[int]], first: int,
              o: EvalOptions, n_threads: int) -> CellResult:
    """One cell: build the rung (when a recipe is given) from the job's source, then score it
    against the encoded reference."""
    rung = None
    _readable(job.models[0] if recipe is not None else spec)
    if recipe is not None:
        src = split_spec(job.models[0])[0]
        rung = build_rungs(src, [recipe], job.out_dir, show_progress=False, calibration=job.calibration)[0]
        spec = normalize_spec(rung.path)
    t0 = time.perf_counter()
    facts = describe(spec)
    rt = open_runtime(spec, o.n_ctx, n_threads)
    try:
        scores, bounds = metrics.Scores(), []
        for c, enc in zip(ids, refs):
            logits = rt.scored_logits(c, first)
            lp = codec.decode(enc)
            metrics.score_against_reference(logits, lp, c[first + 1:], scores)
            for i in range(0, logits.shape[0], codec.ROW_BLOCK):
                xb = logits[i:i + codec.ROW_BLOCK]
                lq = xb.astype(metrics.np.float64) - metrics.logsumexp(xb)
                bounds.append(codec.kld_error_bound(enc, i, lp[i:i + codec.ROW_BLOCK], lq))
            del logits, lp
        load_s = rt.load_s
    finally:
        rt.close()
    row = ModelRow(path=spec, runtime=facts.runtime, is_reference=False, eval_s=time.perf_counter() - t0,
                   eval_load_s=load_s, **metrics.summarize(scores))
    if o.speed:
        row.speed = run_probe(spec, ids[0][:min(o.n_prompt, o.n_ctx)], o.n_gen, o.speed_runs, n_threads)
    return CellResult(row, facts, rung, float(metrics.np.concatenate(bounds).mean()))


# ------------------------------------------------------------------------------- the driver
def _cell_key(chunk_files: list[str], job: Job, spec: str | None, recipe: str | None, o: EvalOptions) -> str:
    h = hashlib.sha256(f"v{CELL_VERSION}|{o.speed}|{o.n_prompt}|{o.n_gen}|{o.speed_runs}|".encode())
    h.update("|".join(os.path.basename(f) for f in chunk_files).encode())
    if recipe is None:
        h.update(f"|model|{spec}|{model_digest(split_spec(spec)[0])}".encode())
    else:
        _, method = parse_rung(recipe, warn=False)
        h.update(f"|rung|{model_digest(split_spec(job.models[0])[0])}|{recipe}".encode())
        if method == "gptq":
            h.update(job.calibration.key().encode())
    return h.hexdigest()[:32]


def _cell_path(key: str) -> str:
    return os.path.join(cache_root(), "cells", f"{key}.json")


def _load_cell(key: str) -> CellResult | None:
    try:
        with open(_cell_path(key)) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return None
    rung = Rung(**d["rung"]) if d["rung"] else None
    if not os.path.exists(split_spec(d["row"]["path"])[0]):
        return None           # the rung file was pruned: make it again
    if rung is not None:
        rung.seconds, rung.reused = 0.0, True
    return CellResult(ModelRow.from_dict(d["row"]), ModelFacts(**d["facts"]), rung, d["kld_bound"])


def _save_cell(key: str, c: CellResult) -> None:
    path = _cell_path(key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    d = {"row": c.row.to_dict(), "facts": dataclasses.asdict(c.facts),
         "rung": dataclasses.asdict(c.rung) if c.rung else None, "kld_bound": c.kld_bound}
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        json.dump(d, f)


def _ref_path(npy: str) -> str:
    return npy[:-len(".npy")] + ".q16.npz"


def _memory(spec: str, n_rows: int, n_vocab: int) -> int:
    """A task's memory: the model's file (read into the runtime) twice, F32 rungs from it, and a
    few float32 / float64 chunks of vocabulary rows."""
    path = split_spec(spec)[0]
    size = (sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)) if os.path.isdir(path)
            else os.path.getsize(path))
    return 2 * size + 6 * n_rows * max(n_vocab, 1) * 8 + (256 << 20)


class Run:
    """The tasks of one or more jobs, submitted together and gathered as they finish."""

    def __init__(self, cluster: Cluster, o: EvalOptions, n_threads: int):
        self.cluster, self.o, self.n_threads = cluster, o, n_threads
        self.pending: dict[Any, tuple] = {}

    def submit(self, job: Job) -> dict[str, Any]:
        """Driver side of one job: reference, chunk keys, then one task per missing cell."""
        o, ray = self.o, self.cluster.ray
        text_path = job.text or o.text or default_text()
        text = read_text(text_path)
        facts = {p: describe(p) for p in dict.fromkeys(job.models)}
        ref = pick_reference(job.models, facts, dataclasses.replace(o, text=text_path), self.n_threads)
        ids, add_bos, ref_rt = tokenize_chunks(ref, text, text_path, o, self.n_threads)
        if ref_rt is not None:
            ref_rt.close()
        first = o.n_ctx // 2
        files = reference_files(ref, ids, o.n_ctx, first, os.path.join(cache_root(), "logprobs"))
        n_vocab = len(ref.facts.vocab) or 262144
        s = {"job": job, "ref": ref, "facts": facts, "text_path": text_path,
             "ch": Chunks(ids, add_bos, first, files, []), "cells": {}, "from_cache": 0, "t0": time.perf_counter()}
        cached = [_ref_path(f) for f in files]
        if o.cache and all(os.path.exists(f) for f in cached):
            s["refs"] = ray.put([codec.load(f) for f in cached])
            s["ref_load_s"], s["ref_cached"] = None, True
            for f in cached:
                eval_cache.touch(f)
        else:
            task = self.cluster.task(reference_task, self.n_threads, _memory(ref.path, len(ids[0]) - first, n_vocab))
            s["refs"], load_ref = task.options(num_returns=2).remote(ref.path, ids, first, o.n_ctx, self.n_threads)
            self.pending[load_ref] = ("ref", s, None)
            s["ref_cached"] = False
        cells = [(m, None) for m in dict.fromkeys(job.models) if m != ref.path] + [(None, r) for r in job.recipes]
        s["order"] = cells
        cell_task_r = self.cluster.task(cell_task, self.n_threads,
                                        _memory(job.models[0], len(ids[0]) - first, n_vocab))
        for spec, recipe in cells:
            key = _cell_key(files, job, spec, recipe, o) if (o.cache and job.out_dir is None) else None
            hit = _load_cell(key) if key else None
            if hit is not None:
                s["cells"][(spec, recipe)] = hit
                s["from_cache"] += 1
                continue
            r = cell_task_r.remote(spec, recipe, job, s["refs"], ids, first, o, self.n_threads)
            self.pending[r] = ("cell", s, (spec, recipe, key))
        return s

    def gather(self) -> None:
        ray = self.cluster.ray
        while self.pending:
            done, _ = ray.wait(list(self.pending), num_returns=1)
            for r in done:
                kind, s, what = self.pending.pop(r)
                value = _get(ray, r)
                if kind == "ref":
                    s["ref_load_s"] = value
                    enc = _get(ray, s["refs"])
                    if self.o.cache:
                        os.makedirs(os.path.dirname(s["ch"].files[0]), exist_ok=True)
                        for f, e in zip(s["ch"].files, enc):
                            with atomic_output(_ref_path(f)) as tmp:
                                codec.save(e, tmp)
                    s["ref_enc"] = enc
                else:
                    spec, recipe, key = what
                    s["cells"][(spec, recipe)] = value
                    if key:
                        _save_cell(key, value)

    def cancel(self) -> None:
        """Ctrl-C: cancel every task (KeyboardInterrupt in the worker, so its temporary outputs
        are removed), give them a few seconds to unwind, then force the rest."""
        ray = self.cluster.ray
        refs = list(self.pending)
        # only the tasks still running: cancelling one that is completing can trip a check in
        # Ray's core worker ("Tried to complete task that was not pending") and abort the driver
        if refs:
            _, refs = ray.wait(refs, num_returns=len(refs), timeout=0)
        for r in refs:
            try:
                ray.cancel(r, recursive=True)
            except Exception:  # noqa: BLE001 (a task that finished meanwhile)
                pass
        _, rest = ray.wait(refs, num_returns=len(refs), timeout=10) if refs else ([], [])
        for r in rest:
            try:
                ray.cancel(r, force=True)
            except Exception:  # noqa: BLE001
                pass
        self.pending.clear()


def _get(ray, r):
    """ray.get, every failure one line: a task's QuantkitError as itself, anything else named."""
    try:
        return ray_cluster.get(ray, r)
    except ray.exceptions.RayTaskError as e:
        raise QuantkitError(f"a Ray task failed: {str(e).strip().splitlines()[-1]}") from None
    except ray.exceptions.RayError as e:
        raise QuantkitError(f"a Ray task failed: {type(e).__name__}: {str(e).strip().splitlines()[0]}") from None


def section(s: dict[str, Any], o: EvalOptions, n_threads: int, cluster: Cluster) -> EvalResult:
    """One job's rows merged into the EvalResult a local run gives."""
    ref, ch, job = s["ref"], s["ch"], s["job"]
    enc = s.get("ref_enc") or cluster.ray.get(s["refs"])
    scores = metrics.Scores()
    for e in enc:
        metrics.score_reference(codec.decode(e), e["targets"], scores)
    ref_row = ModelRow(path=ref.path, runtime=ref.kind, is_reference=True, eval_s=0.0,
                       eval_load_s=s.get("ref_load_s"), **metrics.summarize(scores))
    if o.speed:
        ref_row.speed = run_probe(ref.path, ch.ids[0][:min(o.n_prompt, o.n_ctx)], o.n_gen, o.speed_runs, n_threads)
    cells = [s["cells"][c] for c in s["order"]]
    rows = [ref_row] + [c.row for c in cells]
    facts = {**s["facts"], ref.path: ref.facts, **{c.row.path: c.facts for c in cells}}
    for r, label in zip(rows, model_labels([r.path for r in rows])):
        f = facts[r.path]
        r.set_size(label, f.file_bytes, f.n_params, f.types, f.linear_params, f.linear_bytes)
    timings = {"ref_cached_chunks": len(ch.ids) if s["ref_cached"] else 0,
               "total_s": time.perf_counter() - s["t0"]}
    meta = lm_meta(ref, ch, s["text_path"], o, n_threads, timings)
    per_entry = codec.nbytes(enc[0]) / max(1, enc[0]["codes"].size)
    meta.update(cache=os.path.join(cache_root(), "logprobs") if o.cache else None, machine=machine_info(n_threads))
    meta["ray"] = {
        "address": cluster.address or "local runtime (loopback)", "workers": cluster.workers,
        "cells": len(cells), "cells_from_cache": s["from_cache"], "reference_from_cache": s["ref_cached"],
        "reference_codec": (f"uint16 grid over each row's range (llama-perplexity's KL base file) + top-{codec.TOP_K} "
                            f"and the true token exact: {per_entry:.3f} bytes per entry against 4 for float32"),
        "kld_error_bound": max([c.kld_bound for c in cells], default=0.0),
    }
    res = EvalResult(rows, meta)
    rungs = [c.rung for c in cells if c.rung is not None]
    return label_ladder(res, rungs, job.calibration) if job.recipes else res


def evaluate_on_ray(jobs: list[Job], o: EvalOptions, address: str | None = None,
                    workers: int | None = None) -> list[EvalResult]:
    """Every job's cells as Ray tasks; one EvalResult per job, as a local run gives it."""
    for job in jobs:
        for r in job.recipes:
            parse_rung(r)
        if any(parse_rung(r, warn=False)[1] == "gptq" for r in job.recipes):
            job.calibration.check()
    n_threads = o.n_threads or 1
    eval_cache.max_bytes(o.cache_max)
    before = {job.out_dir: set(os.listdir(job.out_dir)) if os.path.isdir(job.out_dir) else set()
              for job in jobs if job.out_dir}
    with Cluster(address, workers) as cluster:
        run = Run(cluster, o, n_threads)
        try:
            states = [run.submit(job) for job in jobs]
            run.gather()
        except BaseException:
            run.cancel()
            for d, names in before.items():
                _remove_new(d, names)
            raise
        results = [section(s, o, n_threads, cluster) for s in states]
    if o.cache:
        eval_cache.prune(cache_root(), eval_cache.max_bytes(o.cache_max))
    return results


def _remove_new(d: str, names: set[str]) -> None:
    """What this run wrote to a folder the user named (rungs, and the temporary outputs of a task
    that was force-cancelled before it could remove them), when the run does not finish."""
    if not os.path.isdir(d):
        return
    for n in set(os.listdir(d)) - names:
        p = os.path.join(d, n)
        try:
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
        except OSError:
            pass
