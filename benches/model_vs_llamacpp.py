#!/usr/bin/env python3
"""backflow's burn LLaMA beside llama.cpp on the same GGUF, the same threads, in the same run.

    ~/.cache/backflow/venv-llama/bin/python benches/model_vs_llamacpp.py [--batches 1,8,32]
        [--prompt 128] [--new 32] [--threads 2] [--model PATH.gguf] [--dtypes q8,f32]

The venv comes from `scripts/fetch-assets.sh llamacpp` (llama-cpp-python built from source for
this CPU). Prints one Markdown table: prefill and decode tokens/s at each batch size for both
(backflow once per weight format of --dtypes), the ratio backflow / llama.cpp, the resident
memory of each with the model loaded, and the machine's f32 matmul GFLOP/s (burn flex and
numpy's BLAS) as the ceiling both work against.

What is measured, identically on both sides:
- prefill: one pass over batch x prompt random tokens (distinct prompts, no shared prefix),
  logits of each sequence's last token, greedy pick; tokens/s = batch x prompt / seconds.
- decode: the following new - 1 steps, one token for every sequence per step, greedy pick of
  each; tokens/s = batch x steps / seconds.
backflow runs `cargo bench --bench model_throughput` with BENCH_JSON=1 (its own timers, see that
file); llama.cpp runs through llama-cpp-python's low-level API: one context with n_seq_max
sequences, a llama_batch per step, llama_decode, its default n_ubatch of 512.
"""

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = Path.home() / ".cache/backflow/model/SmolLM2-135M-Instruct.Q4_1.gguf"


def backflow_rows(args, dtype):
    """Runs the Rust bench with weights in `dtype`; returns (setup dict, {batch: row dict})."""
    env = dict(os.environ)
    env.update(
        BENCH_DTYPE=dtype,
        BENCH_JSON="1",
        BENCH_BATCHES=",".join(map(str, args.batches)),
        BENCH_PROMPT=str(args.prompt),
        BENCH_NEW=str(args.new),
        BENCH_MODEL=str(args.model),
        RAYON_NUM_THREADS=str(args.threads),
        BENCH_REPEAT=str(args.repeat),
    )
    cmd = ["cargo", "bench", "--bench", "model_throughput"]
    out = subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
    setup, rows = None, {}
    for line in out.splitlines():
        if not line.startswith("{"):
            continue
        obj = json.loads(line)
        if obj["kind"] == "setup":
            setup = obj
        elif obj["kind"] == "row":
            rows[obj["batch"]] = obj
    if setup is None:
        sys.exit("model_throughput printed no JSON setup line")
    return setup, rows


def numpy_gflops(threads):
    """numpy's BLAS f32 matmul on the same [1024,576]x[576,1536] product as the Rust bench."""
    # The BLAS reads its thread count when numpy is imported, hence the child process.
    code = (
        "import numpy as np, time\n"
        "a = np.random.rand(1024, 576).astype(np.float32)\n"
        "w = np.random.rand(576, 1536).astype(np.float32)\n"
        "a @ w\n"
        "n = 50\n"
        "t = time.perf_counter()\n"
        "for _ in range(n): a @ w\n"
        "print(2 * 1024 * 576 * 1536 * n / (time.perf_counter() - t) / 1e9)\n"
    )
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, stdout=subprocess.PIPE, text=True)
    return float(out.stdout.strip())


def rss_mb():
    """This process's resident memory in MB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class LlamaCpp:
    """A llama.cpp context with room for `max_batch` sequences of `per_seq` tokens."""

    def __init__(self, model, threads, max_batch, per_seq):
        import llama_cpp as L

        self.L = L
        rss_before = rss_mb()
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = L.llama_model_load_from_file(str(model).encode(), mp)
        if not self.model:
            sys.exit(f"llama.cpp cannot load {model}")
        cp = L.llama_context_default_params()
        cp.n_ctx = max_batch * per_seq
        cp.n_batch = max_batch * per_seq  # a whole batched prefill in one llama_decode call
        cp.n_seq_max = max_batch
        cp.n_threads = threads
        cp.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            sys.exit("llama.cpp cannot create a context")
        self.vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(cp.n_batch, 0, max_batch)
        # What loading the model and making this context added to the process.
        self.rss_added_mb = rss_mb() - rss_before

    def close(self):
        L = self.L
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)

    def _decode(self, seqs, pos0, logits_last):
        """One llama_decode of `seqs` (one token list per sequence) at positions pos0..; returns
        the greedy pick after each sequence's last token."""
        import numpy as np

        L, bt = self.L, self.batch
        n = 0
        for sid, toks in enumerate(seqs):
            for j, tok in enumerate(toks):
                bt.token[n] = tok
                bt.pos[n] = pos0 + j
                bt.n_seq_id[n] = 1
                bt.seq_id[n][0] = sid
                bt.logits[n] = logits_last and j == len(toks) - 1
                n += 1
        bt.n_tokens = n
        rc = L.llama_decode(self.ctx, bt)
        if rc != 0:
            sys.exit(f"llama_decode failed: {rc}")
        # Outputs come back in batch order: one row per sequence.
        ptr = L.llama_get_logits(self.ctx)
        logits = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(len(seqs), self.vocab))
        return logits.argmax(axis=1).tolist()

    def run(self, prompts, new):
        """Prefill then `new - 1` decode steps; returns (prefill s, decode s, decode steps)."""
        L = self.L
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        t = time.perf_counter()
        nxt = self._decode(prompts, 0, True)
        prefill = time.perf_counter() - t
        pos = len(prompts[0])
        t = time.perf_counter()
        for _ in range(new - 1):
            nxt = self._decode([[x] for x in nxt], pos, True)
            pos += 1
        return prefill, time.perf_counter() - t, new - 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--repeat", type=int, default=2, help="best of N runs per cell, both sides")
    ap.add_argument("--dtypes", default="q8,f32", help="backflow weight formats to run (BENCH_DTYPE)")
    args = ap.parse_args()
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if not args.model.exists():
        sys.exit(f"{args.model} is missing: run scripts/fetch-assets.sh model")

    import numpy as np

    # Sequential, never concurrent: both use every core they are given.
    runs = {d: backflow_rows(args, d) for d in args.dtypes}
    setup = runs[args.dtypes[0]][0]
    npy = numpy_gflops(args.threads)
    rng = np.random.default_rng(7)
    theirs, their_rss = {}, None
    for b in args.batches:
        # A context sized for this batch, as a llama.cpp user would make it: its attention
        # reads every cell of the context, so a context sized for 32 would slow batch 1.
        lc = LlamaCpp(args.model, args.threads, b, args.prompt + args.new)
        lc.run([[1, 2, 3]], 4)  # warm-up, as the Rust bench does
        prompts = rng.integers(3, lc.vocab, size=(b, args.prompt)).tolist()
        best = None
        for _ in range(args.repeat):
            pre, dec, steps = lc.run(prompts, args.new)
            row = dict(prefill_tok_s=b * args.prompt / pre, decode_tok_s=b * steps / dec)
            best = row if best is None else {k: max(v, row[k]) for k, v in best.items()}
        theirs[b] = best
        if their_rss is None:
            their_rss = lc.rss_added_mb
        lc.close()

    load = os.getloadavg()[0]
    print(
        f"model: {args.model.name}; {args.threads} threads; prompt {args.prompt} tokens, {args.new} new tokens; "
        f"best of {args.repeat}; load average at the end {load:.2f} on {os.cpu_count()} cores"
    )
    print(
        f"f32 matmul [1024,576]x[576,1536]: burn flex {setup['matmul_gflops']:.1f} GFLOP/s, "
        f"numpy BLAS {npy:.1f} GFLOP/s"
    )
    print()
    print("| batch | backflow weights | prefill tok/s backflow | llama.cpp | ratio | decode tok/s backflow | llama.cpp | ratio |")
    print("|------:|:-----------------|-----------------------:|----------:|------:|----------------------:|----------:|------:|")
    for b in args.batches:
        t = theirs[b]
        for d in args.dtypes:
            o = runs[d][1].get(b)
            if o is None:
                continue
            print(
                f"| {b:>5} | {d:<16} | {o['prefill_tok_s']:>22.1f} | {t['prefill_tok_s']:>9.1f} | "
                f"{o['prefill_tok_s'] / t['prefill_tok_s']:>5.2f} | {o['decode_tok_s']:>21.1f} | "
                f"{t['decode_tok_s']:>9.1f} | {o['decode_tok_s'] / t['decode_tok_s']:>5.2f} |"
            )
    print()
    size = args.model.stat().st_size / 2**20
    mem = ", ".join(
        f"backflow {d} {runs[d][0].get('rss_loaded_mb') or float('nan'):.0f} MB "
        f"(weights {runs[d][0].get('weights_mb') or float('nan'):.0f} MB)"
        for d in args.dtypes
    )
    print(
        f"resident memory with the model loaded (file {size:.0f} MB): {mem}; "
        f"llama.cpp +{their_rss:.0f} MB (model and a batch-{args.batches[0]} context, mmap'd pages it touched)"
    )


if __name__ == "__main__":
    main()
