"""Data-parallel GPTQ on a Ray cluster: quant.pipeline's block loop with the calibration samples
split across N workers (Ray actors).

Per decoder block:
1. every worker loads the block from the model path (which every worker can read) and takes its
   share of the block's inputs (contiguous samples: worker 0 the first, ...);
2. per true-sequential stage (q/k/v; o; gate/up; down) every worker runs its share through the
   block (pipeline.BlockWork, the same code the single-process loop runs) and returns the
   stage's partial Hessians; the driver sums them in float64, weighted by each worker's row
   count, always in worker order 0, 1, ..., so the sum does not depend on which worker finished
   first. With one worker the sum is that worker's Hessian exactly, and the output is byte for
   byte the single-process one;
3. the stage's matrices are solved in parallel, one actor task per matrix, round-robin over the
   workers (with more than one worker, linears stacked on one grid are solved one per task);
   the driver puts the dequantized weights into its own copy of the block (for the sink) and
   sends them to every worker;
4. each worker propagates its share to the next block's inputs; they go to Ray's object store,
   owned by the driver.

A mixture of experts' sparse block (quant.moe) runs quant.moe.quantize_experts' steps after its
attention stages: every worker routes its share's tokens (the model's router; routing one token
does not depend on which other tokens share its worker) and returns its token count per expert;
per batch of experts (quant.moe.EXPERT_BATCH_ELEMENTS) each worker returns its share's gate/up
Hessians of the batch (the mean over its tokens of each expert), which the driver sums per
expert in float64 in worker order, weighted by the worker's token count of that expert; experts
under `moe_min_tokens` tokens in the global counts are mixed with the pooled Hessian (summed
the same way) exactly as in one process; the batch is solved on one worker (batches
round-robin, at least one per worker, the next batches' Hessians computed while the driver
sums), its stored forms sent to every worker. Then the downs likewise, on the down inputs
through the solved gate/up, the starved experts' last on the pooled down Hessian; each worker
then computes its share's block outputs with the quantized experts. With one worker every sum is that worker's Hessian exactly:
the file is byte for byte the single-process one.

Faults. A worker that dies is restarted by Ray (actor `max_restarts`); the block it was in is
run again from the block's inputs, which the driver owns in the object store: they survive the
worker's process, so no earlier block is recomputed (recomputing from block 0 would need every
earlier block's quantized weights again). Every worker re-reads its share at the start of each
block, which also makes the re-run byte for byte the first run. Ctrl-C kills the actors, shuts
down a runtime this process started, and the sinks leave no partial output.

Memory per worker: one block (float32) plus its share of the activations plus the largest
stage's Hessians, and for a sparse block what the experts' stage adds (quant.moe.
expert_work_bytes): its share's MLP inputs, the Hessians of up to workers + 1 batches of
experts (computed ahead while the driver sums) and one solve, the two pooled Hessians and the
layer's stored forms; never every expert's Hessians at once. Declared as the actors' `memory`
resource (`worker_bytes`, the largest over the blocks) and checked against the nodes before any
work. The driver holds the block, the batches in flight (up to workers + 1, each's Hessians
summed in float64) and the layer's stored forms. Nothing here imports Ray until a run asks
for it.
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..runtimes import ray_cluster
from ..util.errors import QuantkitError
from ..util.memory import trim
from ..util.progress import progress
from .gptq import WORK_DTYPE
from .moe import (DOWN, GATE_UP, ExpertLayer, RoutedTokens, expert_fetch, expert_work_bytes, quantize_experts,
                  safeguard, solve_experts, sparse_mlp)
from .pipeline import (BlockWork, PipelineConfig, PipelineReport, apply_solution, capture_block_inputs,
                       decoder_layers, group_solves, solve, stacked_weight)
from .rtn import QuantSpec

# a worker process with torch and transformers imported and the model's skeleton built
WORKER_BASE_BYTES = 600 << 20
RESTART_WAIT_S = 300.0           # a worker starting or restarting: building the skeleton of a large model


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None      # None or "": a local runtime (or the one this process is connected to)
    workers: int = 2
    cpus_per_worker: int = 1
    max_restarts: int = 3           # per worker; a block is re-run at most this many times

    def __post_init__(self):
        if self.workers < 1:
            raise QuantkitError(f"--workers must be at least 1, got {self.workers}")
        if self.cpus_per_worker < 1:
            raise QuantkitError(f"CPUs per worker must be at least 1, got {self.cpus_per_worker}")


def connect(opts: RayOptions) -> bool:
    """Join the cluster at opts.address, or start a local runtime with enough CPUs for the
    workers, unless this process is already connected; True when this call connected."""
    return ray_cluster.connect(opts.address, max(os.cpu_count() or 1, opts.workers * opts.cpus_per_worker))


def worker_bytes(layer: nn.Module, n_share: int, seqlen: int) -> int:
    """Memory one worker needs: the block in float32, its share of the activations (the block's
    inputs, the o_proj and down_proj inputs the true-sequential stages keep, the object-store
    copy), the largest stage's Hessians, and the process itself; for a mixture of experts also
    what the experts' stage adds (quant.moe.expert_work_bytes)."""
    lin = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    block = sum(p.numel() for p in layer.parameters()) * 4
    hidden = max((m.in_features for n, m in lin.items() if n.endswith("q_proj")), default=0)
    kept = sum(m.in_features for n, m in lin.items() if n.endswith(("o_proj", "down_proj")))
    acts = n_share * seqlen * (3 * hidden + kept) * 4
    hessians = max((m.in_features for m in lin.values()), default=0) ** 2 * 4 * 2
    mlp = sparse_mlp(layer)
    experts = expert_work_bytes(mlp, n_share * seqlen) if mlp is not None else 0
    return WORKER_BASE_BYTES + block + acts + hessians + experts


def check_resources(nodes: list[dict], need: int, opts: RayOptions) -> None:
    """One line when the cluster's alive nodes cannot host opts.workers workers of `need` bytes
    and opts.cpus_per_worker CPUs each (the actors would otherwise wait forever)."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", n.get("alive", True))]
    gib = 2 ** 30
    largest = max((r.get("memory", 0) for r in alive), default=0)
    if largest < need:
        raise QuantkitError(f"each Ray worker needs {need / gib:.2f} GiB for one decoder block, its share of the "
                            f"calibration activations and the Hessians; the largest node offers "
                            f"{largest / gib:.2f} GiB",
                            hint="use nodes with more memory, more --workers (smaller shares) or fewer --nsamples")
    fits = sum(min(int(r.get("memory", 0) // need), int(r.get("CPU", 0) // opts.cpus_per_worker)) for r in alive)
    if fits < opts.workers:
        raise QuantkitError(f"the Ray cluster has room for {fits} of the {opts.workers} workers "
                            f"({need / gib:.2f} GiB and {opts.cpus_per_worker} CPU each)",
                            hint="lower --workers or add nodes")


def sum_hessians(parts: list, counts: list[int]) -> torch.Tensor:
    """Σ_w (n_w / N) H_w in float64, in the order given (worker 0 first), as WORK_DTYPE: the
    Hessian of all N rows, since each H_w is the mean over its worker's n_w rows. `parts`: the
    partial Hessians or callables returning them (fetched one at a time)."""
    total = sum(counts)
    acc = None
    for H, n in zip(parts, counts):
        H = H() if callable(H) else H
        if acc is None:
            acc = torch.zeros(H.shape, dtype=torch.float64)
        acc.add_(H.to(torch.float64), alpha=n / total)
        del H
    return acc.to(WORK_DTYPE)


def sum_expert_hessians(parts: list, counts: list[list[int]]) -> torch.Tensor:
    """sum_hessians per expert of a batch: parts[w] [B, in, in] (or a callable returning it),
    worker w's Hessians of the batch's experts over counts[w][b] tokens each, summed in float64
    in worker order. An expert no token reached anywhere gets zeros (as its Hessian over no
    tokens is in one process)."""
    totals = [sum(c[b] for c in counts) for b in range(len(counts[0]))]
    acc = None
    for H, cs in zip(parts, counts):
        H = H() if callable(H) else H
        if acc is None:
            acc = torch.zeros(H.shape, dtype=torch.float64)
        for b, n in enumerate(cs):
            if n:
                acc[b].add_(H[b].to(torch.float64), alpha=n / totals[b])
        del H
    return acc.to(WORK_DTYPE)


class BlockWorker:
    """A Ray actor: one share of the calibration samples through one decoder block at a time."""

    def __init__(self, index: int, path: str, cfg: PipelineConfig, threads: int):
        self.index, self.path, self.cfg = index, path, cfg
        self.error: str | None = None
        self.work: BlockWork | None = None
        self.routed: RoutedTokens | None = None      # a sparse MLP's share of the calibration
        self.experts: ExpertLayer | None = None
        self.seconds: dict[str, float] = {}
        torch.set_num_threads(threads)
        try:
            self._open(path)
        except QuantkitError as e:
            self.error = f"Ray worker {index} on {socket.gethostname()}: {e}"
        except OSError as e:
            self.error = (f"Ray worker {index} on {socket.gethostname()} cannot read the model path {path} "
                          f"({e.strerror or e})")

    def _open(self, path: str) -> None:
        from ..models.hf import HFSource
        from ..models.open import open_model
        from .streaming import block_loader, streaming_model
        if not os.access(path, os.R_OK):
            raise OSError(13, "not readable or not there")
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
            self.src = HFSource(path, tokenizer=False)
        else:
            self.src = open_model(path)
        model, tokenizer, _, fetch = streaming_model(self.src, path, lazy_embeddings=True)
        del tokenizer
        n_expert = int(getattr(self.src.spec, "n_expert", 0) or 0)
        if n_expert:                # as the driver loads them (quant.driver.quantize_blocks)
            fetch = expert_fetch(fetch, n_expert, compact=True)
        model.get_input_embeddings().to("meta")
        _, self.layers, self.prefix = decoder_layers(model)
        self.model, self.load = model, block_loader(fetch, path)
        self.shapes = [{n: tuple(p.shape) for n, p in layer.named_parameters()} for layer in self.layers]

    def _timed(self, phase: str, t0: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

    def ready(self) -> str | None:
        """None, or the one line saying why this worker cannot work."""
        return self.error

    def begin(self, i: int, hidden: np.ndarray, kwargs: dict) -> list[list[tuple[str, ...]]]:
        """Load block i and take this worker's share of its inputs [n, 1, seqlen, hidden] and
        the keyword arguments the block is called with; the block's stages."""
        t0 = time.perf_counter()
        if self.error:
            raise QuantkitError(self.error)
        self._drop()
        layer = self.layers[i]
        lp = f"{self.prefix}.{i}"
        for n, p in layer.named_parameters():      # a block run again: its storage was released
            if tuple(p.shape) != self.shapes[i][n]:
                p.data = torch.empty(self.shapes[i][n], dtype=p.dtype)
        self.load(i, lp, layer)
        self.h = torch.from_numpy(np.array(hidden))          # a writable copy of the object-store buffer
        self.done: dict = {}
        self.work = BlockWork(layer, lp, list(self.h.unbind(0)), kwargs, self.cfg, streaming=True)
        self._timed("load", t0)
        return self.work.stages

    def hessians(self, k: int) -> dict:
        t0 = time.perf_counter()
        hs = self.work.hessians(k, self.done)
        self._timed("hessians", t0)
        return hs

    def solve(self, label: str, W: torch.Tensor, H: torch.Tensor, grid, gptq) -> tuple:
        t0 = time.perf_counter()
        res = solve(label, W, H, grid, replace(self.cfg, gptq=gptq))
        self._timed("solve", t0)
        return res

    def set_weights(self, k: int, weights: dict[str, torch.Tensor]) -> None:
        """Stage k's solved weights (dequantized, by linear name) into this worker's block."""
        t0 = time.perf_counter()
        w = self.work
        for g in w.stages[k]:
            for n in g:
                if n in weights:
                    w.lin[n].weight.data = weights[n].clone()
                    self.done[f"{w.lp}.{n}"] = True
            w.quantized(g, self.done)
        self._timed("set_weights", t0)

    def moe_route(self) -> list[int]:
        """The block's sparse MLP, once its attention is quantized: this share's tokens routed;
        their count per expert."""
        t0 = time.perf_counter()
        w = self.work
        self.experts = ExpertLayer(sparse_mlp(w.layer), w.lp, self.cfg, PipelineReport(), {})
        self.routed = RoutedTokens(w.layer, self.experts.mlp, w.hidden, w.kwargs)
        self._timed("hessians", t0)
        return self.routed.counts

    def moe_pooled_gate_up(self) -> torch.Tensor:
        return self.routed.pooled_gate_up()

    def moe_gate_up_hessians(self, es: list[int]) -> torch.Tensor:
        t0 = time.perf_counter()
        H = self.routed.gate_up_hessians(es)
        self._timed("hessians", t0)
        return H

    def moe_put(self, pieces: dict) -> None:
        """Experts' stored forms solved on the driver's orders (ExpertLayer.pieces)."""
        self.experts.put(pieces)

    def moe_down_hessians(self, es: list[int]) -> torch.Tensor:
        """Experts es's down Hessians (their gate/up already put); asked in expert order."""
        t0 = time.perf_counter()
        H = self.routed.down_hessians(es, self.experts.solved_gate_up)
        self._timed("hessians", t0)
        return H

    def moe_starved_down_hessians(self, es: list[int]) -> torch.Tensor:
        """Starved experts es's down Hessians once more (their few tokens), not pooled again."""
        t0 = time.perf_counter()
        H = self.routed.down_hessians(es, self.experts.solved_gate_up, pool=False)
        self._timed("hessians", t0)
        return H

    def moe_pooled_down(self) -> tuple:
        return self.routed.pooled_down()

    def solve_experts(self, label: str, W: torch.Tensor, H: torch.Tensor, grid, gptq) -> list:
        t0 = time.perf_counter()
        res = solve_experts(label, W, H, grid, gptq)
        self._timed("solve", t0)
        return res

    def propagate(self) -> tuple[np.ndarray, int]:
        """This share's outputs of the block (the next block's inputs), and the block freed."""
        t0 = time.perf_counter()
        if self.routed is not None:         # residual + attention, plus the quantized experts
            self.routed.output(self.experts.write_back, self.experts.solved)
        else:
            self.work.propagate()
        out = self.h.numpy()
        self._drop()
        self._timed("propagate", t0)
        return out, os.getpid()

    def _drop(self) -> None:
        if self.work is not None:
            for p in self.work.layer.parameters():     # storage released, the module kept for a re-run
                p.data = torch.empty(0, dtype=p.dtype)
            self.work = None
            self.h = None
            self.routed = self.experts = None
            trim()

    def stats(self) -> dict:
        import resource
        r = resource.getrusage(resource.RUSAGE_SELF)
        return {"worker": self.index, "pid": os.getpid(), "host": socket.gethostname(),
                "peak_rss_mb": r.ru_maxrss / 1024, "cpu_s": r.ru_utime + r.ru_stime, "seconds": self.seconds}


def _add(report: PipelineReport, phase: str, t0: float) -> float:
    t = time.perf_counter()
    report.phases[phase] = report.phases.get(phase, 0.0) + t - t0
    return t


def _wait_restarted(ray, workers: list) -> None:
    """Until every worker answers (Ray restarts a dead one); its one-line error if it cannot work."""
    deadline = time.time() + RESTART_WAIT_S
    for w in workers:
        while True:
            try:
                err = ray.get(w.ready.remote(), timeout=max(1.0, deadline - time.time()))
                if err:
                    raise QuantkitError(err)
                break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                if time.time() > deadline:
                    raise QuantkitError(f"a Ray worker died and was not back within {RESTART_WAIT_S:.0f} s") from None
                time.sleep(0.5)


@torch.no_grad()
def quantize_model_ray(model: nn.Module, input_ids: torch.Tensor, cfg: PipelineConfig, path: str, opts: RayOptions,
                       on_block: Callable[[int, str, nn.Module, dict], None],
                       load_block: Callable[[int, str, nn.Module], None],
                       show_progress: bool = True) -> PipelineReport:
    """quant.pipeline.quantize_model (streaming) with the calibration split over opts.workers
    Ray actors; `path`: the model, as every worker reads it. The report also carries each
    worker's peak RSS and seconds per phase (report.workers)."""
    t0 = time.perf_counter()
    report = PipelineReport()
    _, layers, prefix = decoder_layers(model)
    if cfg.method != "gptq":
        raise QuantkitError(f"--ray spreads GPTQ's calibration over workers; method {cfg.method} has none",
                            hint="leave out --ray, or use --method gptq")
    n, seqlen = input_ids.shape
    if opts.workers > n:
        raise QuantkitError(f"--workers {opts.workers} is more than the {n} calibration samples",
                            hint="lower --workers or raise --nsamples")
    bounds = [round(w * n / opts.workers) for w in range(opts.workers + 1)]
    share = max(b - a for a, b in zip(bounds, bounds[1:]))
    need = max(worker_bytes(layer, share, seqlen) for layer in layers)     # a model may mix dense and sparse blocks
    ray = ray_cluster.import_ray()
    started = connect(opts)
    workers: list = []
    try:
        check_resources(ray.nodes(), need, opts)
        inputs = capture_block_inputs(model, input_ids)
        for mod in model.modules():              # the embeddings' work is done
            if isinstance(mod, nn.Embedding):
                mod.to("meta")
        hidden = torch.stack(inputs.hidden)
        inputs.hidden = None
        refs = [ray.put(hidden[a:b].numpy()) for a, b in zip(bounds, bounds[1:])]
        counts = [(b - a) * seqlen for a, b in zip(bounds, bounds[1:])]
        del hidden
        # per block, its arguments (masks, rotary tables) in the store, where a restarted worker finds them
        kwargs_refs = [ray.put(kw) for kw in inputs.layer_kwargs]
        actor = ray.remote(BlockWorker).options(num_cpus=opts.cpus_per_worker, memory=need,
                                                max_restarts=opts.max_restarts, max_task_retries=0)
        wcfg = replace(cfg, grid=QuantSpec())    # workers solve the grid they are sent
        workers = [actor.remote(w, path, wcfg, opts.cpus_per_worker) for w in range(opts.workers)]
        _wait_restarted(ray, workers)            # every worker up (a worker lost while starting comes back)
        t = _add(report, "capture", t0)
        bar = progress(total=len(layers), desc=f"gptq blocks on {opts.workers} Ray workers", unit="block",
                       leave=False) if show_progress else None
        try:
            for i, layer in enumerate(layers):
                lp = f"{prefix}.{i}"
                for attempt in range(opts.max_restarts + 1):
                    load_block(i, lp, layer)
                    t = _add(report, "load", t)
                    try:
                        done, refs, t = _block(ray, workers, i, lp, layer, refs, kwargs_refs[i], counts, cfg,
                                               report, t)
                        break
                    except ray.exceptions.RayActorError:
                        if attempt == opts.max_restarts:
                            raise QuantkitError(f"Ray workers died {attempt + 1} times in block {i}; giving up",
                                                hint="see the Ray logs of the nodes (/tmp/ray/session_latest/logs)")
                        _wait_restarted(ray, workers)
                        report.phases["retries"] = report.phases.get("retries", 0) + 1
                on_block(i, lp, layer, done)
                t = _add(report, "write", t)
                layer.to("meta")
                done.clear()
                trim()
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        report.workers = ray_cluster.get(ray, [w.stats.remote() for w in workers])
    finally:
        for w in workers:
            ray.kill(w)
        if started:
            ray.shutdown()
    report.seconds = time.perf_counter() - t0
    return report


def _block(ray, workers, i, lp, layer, refs, kwargs_ref, counts, cfg, report, t):
    """One block on the workers; (stored forms by linear, the next block's input refs, time)."""
    lin = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    stages = ray_cluster.get(ray, [w.begin.remote(i, ref, kwargs_ref) for w, ref in zip(workers, refs)])[0]
    split = len(workers) > 1
    done: dict = {}
    for k, stage in enumerate(stages):
        parts = [w.hessians.remote(k) for w in workers]
        ray.wait(parts, num_returns=len(parts), fetch_local=False)
        hs = {g: sum_hessians([lambda r=r, g=g: ray_cluster.get(ray, r)[g] for r in parts], counts) for g in stage}
        del parts
        t = _add(report, "hessians", t)
        jobs, j = [], 0
        for g in stage:
            H_ref = ray.put(hs.pop(g))
            for grid, members in group_solves(lp, g, cfg):
                for unit in ([[m] for m in members] if split else [members]):
                    label = ", ".join(f"{lp}.{m}" for m in unit)
                    jobs.append((unit, workers[j % len(workers)].solve.remote(label, stacked_weight(lin, unit), H_ref,
                                                                              grid, cfg.gptq)))
                    j += 1
        weights: dict[str, torch.Tensor] = {}
        for unit, ref in jobs:
            weights.update(apply_solution(lp, unit, lin, ray_cluster.get(ray, ref), report, done))
        w_ref = ray.put(weights)
        ray_cluster.get(ray, [w.set_weights.remote(k, w_ref) for w in workers])
        del weights, w_ref
        t = _add(report, "solve", t)
    t = _experts(ray, workers, layer, lp, counts, cfg, report, done, t)
    outs = [w.propagate.options(num_returns=2).remote() for w in workers]
    ray_cluster.get(ray, [pid for _, pid in outs])                   # raises if a worker died; the data stay in the store
    t = _add(report, "propagate", t)
    return done, [h for h, _ in outs], t


def _ahead(batches: list[list[int]], submit: Callable, depth: int):
    """(batch, submit(batch)) in order, each submitted `depth` batches before it is handed out:
    the workers compute the next batches' Hessians while the driver sums this one's."""
    pending: deque = deque()
    for es in batches:
        pending.append((es, submit(es)))
        if len(pending) > depth:
            yield pending.popleft()
    while pending:
        yield pending.popleft()


class _ExpertSolves:
    """Batches of experts solved on the workers, round-robin, their results applied on the
    driver in the order submitted and their stored forms sent to every worker (`moe_put`)."""

    def __init__(self, ray, workers: list, layer: ExpertLayer, gptq):
        self.ray, self.workers, self.layer, self.gptq = ray, workers, layer, gptq
        self.queue: deque = deque()
        self.puts: list = []
        self.n = 0

    def submit(self, es: list[int], parts: tuple[str, ...], H: torch.Tensor) -> None:
        H_ref = self.ray.put(H)
        jobs = []
        for label, ks, W, grid in self.layer.jobs(es, parts):
            w = self.workers[self.n % len(self.workers)]
            self.n += 1
            jobs.append((ks, w.solve_experts.remote(label, W, H_ref, grid, self.gptq)))
        self.queue.append((es, parts, jobs))

    def drain(self, keep: int) -> None:
        """Until at most `keep` batches are in flight."""
        while len(self.queue) > keep:
            es, parts, jobs = self.queue.popleft()
            for ks, ref in jobs:
                self.layer.apply(es, parts, ks, ray_cluster.get(self.ray, ref))
            pieces = self.ray.put(self.layer.pieces(es, parts))
            self.puts += [w.moe_put.remote(pieces) for w in self.workers]


# one stage, the steps of quant.moe.quantize_experts with the Hessians summed over the workers
def _experts(ray, workers, layer, lp, rows, cfg, report, done, t):
    """A sparse block's experts (quant.moe.quantize_experts' steps): each worker routes its
    share; per batch of experts its partial Hessians are summed per expert in worker order, the
    starved ones mixed with the pooled Hessian from the global counts, and the batch solved on a
    worker; the solved stored forms go to every worker, whose `propagate` then runs the
    quantized experts. `rows`: each worker's token count. Nothing for a dense block."""
    mlp = sparse_mlp(layer)
    if mlp is None or cfg.sparse_mlp is None:
        return t
    if cfg.sparse_mlp is not quantize_experts:
        raise QuantkitError("Ray workers calibrate the experts of a mixture of experts with GPTQ only",
                            hint="run without --ray")
    for d in (report.loss, report.damp):        # a block run again sums its experts afresh
        for k in [k for k in d if k.startswith(f"{lp}.mlp.experts.")]:
            del d[k]
    L = ExpertLayer(mlp, lp, cfg, report, done)
    shares = ray_cluster.get(ray, [w.moe_route.remote() for w in workers])
    counts, m = [sum(c) for c in zip(*shares)], L.min_tokens
    starved = [e for e, c in enumerate(counts) if c < m]
    pooled = sum_hessians([lambda r=r: ray_cluster.get(ray, r) for r in
                           [w.moe_pooled_gate_up.remote() for w in workers]], rows) if starved else None
    solves, depth = _ExpertSolves(ray, workers, L, cfg.gptq), len(workers)

    def summed(es, refs):
        return sum_expert_hessians([lambda r=r: ray_cluster.get(ray, r) for r in refs],
                                   [[s[e] for e in es] for s in shares])

    gate_up = [w.moe_gate_up_hessians for w in workers]
    for es, refs in _ahead(L.batches(GATE_UP, ways=depth), lambda es: [f.remote(es) for f in gate_up], depth):
        solves.submit(es, GATE_UP, safeguard(summed(es, refs), es, counts, pooled, m))
        solves.drain(depth)
    solves.drain(0)                             # every gate/up on the workers before their down inputs
    down = [w.moe_down_hessians for w in workers]
    for es, refs in _ahead(L.batches(DOWN, ways=depth), lambda es: [f.remote(es) for f in down], depth):
        H = summed(es, refs)
        fed = [b for b, e in enumerate(es) if counts[e] >= m]
        if fed:
            solves.submit([es[b] for b in fed], DOWN, H if len(fed) == len(es) else H[fed])
        solves.drain(depth)
        del H
    if starved:
        pd = ray_cluster.get(ray, [w.moe_pooled_down.remote() for w in workers])
        n_dn = sum(n for _, n in pd)
        pooled_dn = sum_hessians([H for H, n in pd if n], [n for _, n in pd if n]) if n_dn else None
        del pd
        again = [w.moe_starved_down_hessians for w in workers]
        for es in L.batches(DOWN, starved, ways=depth):
            H = summed(es, [f.remote(es) for f in again])
            solves.submit(es, DOWN, safeguard(H, es, counts, pooled_dn, m) if n_dn else H)
            solves.drain(depth)
    solves.drain(0)
    ray_cluster.get(ray, solves.puts)
    L.finish(counts, starved)
    return _add(report, "experts", t)
