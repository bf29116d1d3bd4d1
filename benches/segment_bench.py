#!/usr/bin/env python3
"""Benchmark: read + extract + segment + dedup throughput of `backflow segment` on 1 and 2 workers,
against the Python pipeline users would otherwise pick (datatrove's WarcReader + Trafilatura
extractor) on the same pages in the same run, printed as a table.

    scripts/fetch-assets.sh pages peers
    cargo build --release
    ~/.cache/backflow/venv/bin/python benches/segment_bench.py [--copies 4]

The input is the Python docs (530 real pages, 50.7 MB of HTML) packed by `backflow warc-pack`,
copied `--copies` times into separate files so that work can be shared by file. backflow also
segments and deduplicates; datatrove only reads and extracts (the cheaper half of the work), so
the ratio is conservative. Timings are wall clock of whole runs, process start included.
"""
import argparse, json, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("BACKFLOW_CACHE", Path.home() / ".cache/backflow"))
BIN = ROOT / "target/release/backflow"


def run_backflow(inputs, out, workers):
    t = time.perf_counter()
    subprocess.run([BIN, "segment", *inputs, "--out", out, "-w", str(workers), "-q"], check=True,
                   stderr=subprocess.DEVNULL)
    elapsed = time.perf_counter() - t
    summary = json.loads((Path(out) / "summary.json").read_text())
    return elapsed, summary["records_read"], summary["passages_written"]


def run_datatrove(folder, out):
    code = f"""
import time, logging
logging.disable(logging.CRITICAL)
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.readers import WarcReader
from datatrove.pipeline.extractors import Trafilatura
from datatrove.pipeline.writers import JsonlWriter
t = time.perf_counter()
LocalPipelineExecutor(pipeline=[WarcReader({str(folder)!r}, glob_pattern="*.warc.gz"),
                                Trafilatura(favour_precision=True, timeout=600.0),
                                JsonlWriter({str(out)!r})],
                      tasks=1, workers=1, logging_dir={str(out) + "-logs"!r}).run()
print(time.perf_counter() - t)
"""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    elapsed = time.perf_counter() - t
    docs = 0
    for f in Path(out).glob("*.jsonl.gz"):
        import gzip
        docs += sum(1 for _ in gzip.open(f, "rt"))
    return elapsed, docs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=4)
    args = ap.parse_args()
    pages = CACHE / "pages/python3.11"
    tmp = Path(tempfile.mkdtemp(prefix="backflow-bench-"))
    try:
        warc = tmp / "in" / "docs0.warc.gz"
        warc.parent.mkdir()
        subprocess.run([BIN, "warc-pack", pages, "--out", warc], check=True, stderr=subprocess.DEVNULL)
        for i in range(1, args.copies):
            shutil.copy(warc, tmp / "in" / f"docs{i}.warc.gz")
        inputs = sorted(str(p) for p in (tmp / "in").glob("*.warc.gz"))
        in_mb = sum(os.path.getsize(p) for p in inputs) / 1e6
        html_mb = sum(p.stat().st_size for p in pages.rglob("*.html")) * args.copies / 1e6
        rows = []
        b1 = run_backflow(inputs, tmp / "b1", 1)
        b2 = run_backflow(inputs, tmp / "b2", 2)
        d1 = run_datatrove(tmp / "in", tmp / "dt")
        rows.append(("backflow segment -w 1", 1, *b1[:2]))
        rows.append(("backflow segment -w 2", 2, *b2[:2]))
        rows.append(("datatrove WarcReader+Trafilatura", 1, d1[0], b1[1]))
        print(f"input: {len(inputs)} files, {in_mb:.1f} MB gzip WARC, {html_mb:.1f} MB HTML, "
              f"{b1[1]} records; backflow wrote {b1[2]} passages, datatrove {d1[1]} documents")
        print(f"{'pipeline':<36}{'cores':>6}{'seconds':>9}{'HTML MB/s':>11}{'records/s':>11}{'per core vs datatrove':>23}")
        dt_rate = html_mb / d1[0]
        for name, cores, secs, recs in rows:
            rate = html_mb / secs
            print(f"{name:<36}{cores:>6}{secs:>9.2f}{rate:>11.1f}{recs / secs:>11.0f}{rate / cores / dt_rate:>22.1f}x")
        print(f"scaling 1 -> 2 workers: {b1[0] / b2[0]:.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
