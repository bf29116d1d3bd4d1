#!/usr/bin/env python3
"""Benchmark: the Humpback loop end to end (`backflow run humpback`), printed as a table:
passages/hour end to end, and prompts/s of augment (the backward model) and of rate (the forward
models), with the model server's shared-prefix KV cache on and off, in the same run.

    scripts/fetch-assets.sh pages model seed
    cargo build --release
    python3 benches/humpback_bench.py [--limit 32] [--workers 2] [--steps 8]

Step 0 (training M_yx and M_0) runs once, in a warm-up run whose checkpoints the measured runs are
given (`--backward-model`, `--seed-model`), so the measured runs differ only in the prefix cache.
Each measured run starts from an empty output folder: nothing is answered from the answer cache.
prompts/s is per second of model time (the server's busy time for that model); passages/hour is
passages taken over the whole wall time of the run, training of M_1 and M_2 included.
"""
import argparse, json, os, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("BACKFLOW_CACHE", Path.home() / ".cache/backflow"))
BIN = ROOT / "target/release/backflow"


def humpback(out, args, extra, limit=None):
    cmd = [str(BIN), "run", "humpback", "--out", str(out), "--limit", str(limit or args.limit),
           "--train-steps", str(args.steps), "-w", str(args.workers), "-q", *extra]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    return wall, json.loads((Path(out) / "metrics.json").read_text())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps of every training")
    args = ap.parse_args()
    if not BIN.exists():
        sys.exit("build first: cargo build --release")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"warm-up: step 0 (M_yx, M_0), {args.steps} steps each", file=sys.stderr)
        humpback(tmp / "warm", args, ["--rounds", "1"], limit=1)
        given = ["--backward-model", str(tmp / "warm/checkpoints/backward"),
                 "--seed-model", str(tmp / "warm/checkpoints/round-0")]
        rows = []
        for label, flags in [("on", []), ("off", ["--no-prefix-cache"])]:
            print(f"measuring: prefix cache {label}", file=sys.stderr)
            wall, m = humpback(tmp / f"run-{label}", args, given + flags)
            t = m["throughput"]
            rows.append((label, wall, m["passages"], m["passages"] / wall * 3600,
                         t["augment"]["prompts"], t["augment"]["prompts_per_sec"],
                         t["rate"]["prompts"], t["rate"]["prompts_per_sec"],
                         sum(r["train"]["secs"] for r in m["rounds"])))
    print(f"\n{args.limit} passages of the Python docs, -w {args.workers}, 2 rounds, "
          f"{args.steps} training steps per round, {os.cpu_count()} cores\n")
    print("| prefix cache | wall s | passages | passages/hour | augment prompts | augment prompts/s "
          "| rate prompts | rate prompts/s | training s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.0f} | {r[2]} | {r[3]:.0f} | {r[4]} | {r[5]:.2f} | {r[6]} | "
              f"{r[7]:.2f} | {r[8]:.0f} |")
    on, off = rows
    print(f"\nrate prompts/s, prefix cache on / off: {on[7] / max(off[7], 1e-9):.2f}x")


if __name__ == "__main__":
    main()
