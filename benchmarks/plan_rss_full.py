"""Peak resident memory of llama.cpp at a full context, as people run it: llama-cpp-python from
Python and llama.cpp's own llama-server. Used by benchmarks/plan_vs_measured.py --full-context.

Workload, per (file, runtime, n_ctx), in a fresh process, one at a time:
- llama-cpp-python: `Llama(path, n_ctx=N, swa_full=False)`, every other argument at its default
  (flash attention off, logits of the last token only, n_batch = n_ubatch = 512). swa_full=False
  as llama.cpp's tools default to (common.h); left unset, llama-cpp-python passes the C API's default,
  llama_context_default_params().swa_full = true, a full-size cache for sliding-window layers. Then `create_completion(prompt_tokens, max_tokens=16, temperature=0)` with
  the first N - 16 tokens of wikitext-2 test (BOS first). Peak = VmHWM of that process at the end
  (the interpreter, numpy and the bindings are part of it).
- llama-server: `llama-server -m path -c N` with every other setting at its default (slots,
  unified KV cache, flash attention auto, prompt cache, context checkpoints), then one
  POST /completion over localhost with the same N - 16 token ids and n_predict 16. Peak = the
  server process's VmHWM after the reply.
Both log their buffer sizes (KV, compute, output); those are parsed and kept.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
N_GEN = 16
THREADS = int(os.environ.get("QUANTKIT_BENCH_THREADS", "1"))
SERVER = os.path.join(os.environ.get("QUANTKIT_CACHE", os.path.expanduser("~/.cache/quantkit")),
                      "llama-tools", "bin", "llama-server")


def wikitext_test(n_tokens: int | None = None) -> str:
    """wikitext-2 test; with n_tokens, a prefix long enough for that many tokens (8 characters a
    token: Gemma's tokenizer makes about 4), so that the process holds the prompt, not the split."""
    with open(os.path.join(REPO, "src", "quantkit", "data", "wikitext-2", "test.txt"), encoding="utf-8") as f:
        return f.read() if n_tokens is None else f.read(8 * n_tokens + 4096)


def status_kib(pid: int | str = "self") -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, rest = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[k] = int(rest.split()[0]) * 1024
    return out


def child_python(path: str, n_ctx: int) -> None:
    """Runs in its own interpreter (plan_vs_measured.py --child-full): prints RESULT {...}."""
    base = status_kib()
    import numpy  # noqa: F401  (llama_cpp imports it; recorded separately)
    import llama_cpp
    after_import = status_kib()
    t0 = time.time()
    llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_threads=THREADS, n_threads_batch=THREADS, swa_full=False,
                          verbose=True)
    load_s = time.time() - t0
    after_load = status_kib()
    toks = llm.tokenize(wikitext_test(n_ctx).encode("utf-8"), add_bos=True)[: n_ctx - N_GEN]
    assert len(toks) == n_ctx - N_GEN, len(toks)
    t0, c0 = time.time(), time.process_time()
    out = llm.create_completion(toks, max_tokens=N_GEN, temperature=0.0)
    run_s, cpu_s = time.time() - t0, time.process_time() - c0
    end = status_kib()
    print("RESULT " + json.dumps({"base": base, "after_import": after_import, "after_load": after_load, "end": end,
                                  "peak_rss": end["VmHWM"], "n_prompt": len(toks),
                                  "n_generated": out["usage"]["completion_tokens"], "load_s": load_s,
                                  "run_s": run_s, "cpu_s": cpu_s}), flush=True)


def logged(stderr: str) -> dict[str, float]:
    """Buffer sizes llama.cpp logs (bytes)."""
    mib = lambda pat: [float(x) * 2**20 for x in re.findall(pat, stderr)]  # noqa: E731
    return {"kv": sum(mib(r"KV buffer size =\s+([\d.]+) MiB")),
            "compute": (mib(r"CPU compute buffer size =\s+([\d.]+) MiB") or [0])[-1],
            "output": sum(mib(r"CPU\s+output buffer size =\s+([\d.]+) MiB")),
            "repack": sum(mib(r"CPU_REPACK model buffer size =\s+([\d.]+) MiB")),
            "mapped": sum(mib(r"CPU_Mapped model buffer size =\s+([\d.]+) MiB"))}


def measure_python(script: str, path: str, n_ctx: int, timeout: int = 3600) -> dict:
    p = subprocess.run(["nice", sys.executable, script, "--child-full", path, str(n_ctx)],
                       capture_output=True, text=True, timeout=timeout)
    res = next((json.loads(ln[7:]) for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if res is None:
        raise RuntimeError(f"llama-cpp-python child failed: {p.stderr[-2000:]}")
    res["logged"] = logged(p.stderr)
    return res


def _post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_server(path: str, n_ctx: int, timeout: int = 3600) -> dict:
    if not os.path.exists(SERVER):
        raise RuntimeError(f"{SERVER} missing: run WITH_SERVER=1 benchmarks/build_llama_tools.sh")
    port = _free_port()
    log = open(f"/tmp/plan_rss_server_{os.getpid()}.log", "w+")
    proc = subprocess.Popen(["nice", SERVER, "-m", path, "-c", str(n_ctx), "-t", str(THREADS), "-tb", str(THREADS),
                             "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            if proc.poll() is not None:
                raise RuntimeError("llama-server exited: " + open(log.name).read()[-2000:])
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() - t0 > 600:
                raise RuntimeError("llama-server did not come up")
            time.sleep(0.5)
        load_s = time.time() - t0
        after_load = status_kib(proc.pid)
        text = wikitext_test(n_ctx)
        toks = _post(url + "/tokenize", {"content": text, "add_special": True}, 600)["tokens"][: n_ctx - N_GEN]
        assert len(toks) == n_ctx - N_GEN, len(toks)
        t0 = time.time()
        c0 = _cpu_s(proc.pid)
        out = _post(url + "/completion", {"prompt": toks, "n_predict": N_GEN, "temperature": 0.0}, timeout)
        run_s, cpu_s = time.time() - t0, _cpu_s(proc.pid) - c0
        end = status_kib(proc.pid)
        return {"after_load": after_load, "end": end, "peak_rss": end["VmHWM"], "n_prompt": len(toks),
                "n_generated": out.get("tokens_predicted"), "prompt_n": out.get("timings", {}).get("prompt_n"),
                "load_s": load_s, "run_s": run_s, "cpu_s": cpu_s,
                "logged": logged(open(log.name).read())}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        os.remove(log.name)


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
