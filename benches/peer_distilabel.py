#!/usr/bin/env python3
"""The peer: backflow's augment + rate against distilabel over llama.cpp, in one run, same
passages, same GGUF, same prompts, sampling and token limits, same threads. Prints a table.

    scripts/fetch-assets.sh pages model llamacpp
    ~/.cache/backflow/venv-llama/bin/pip install distilabel==1.5.3 requests
    cargo build --release
    ~/.cache/backflow/venv-llama/bin/python benches/peer_distilabel.py [--passages 256]
        [--threads 2] [--model PATH.gguf] [--backflow-only]

`--backflow-only` runs backflow's side alone (to compare two builds of backflow: set
`BACKFLOW_BIN=PATH` to the binary to time; default `target/release/backflow`).

What each side does, per passage of the Python docs (`backflow segment`'s passages, the first N):
- augment: the paper's backward prompt (`train::data::backward_prompt`: the instruction request,
  the passage, the seed tag) as the user turn of the model's chat template; sampled at T = 0.7,
  top-p 0.9, at most 64 new tokens (backflow's `--augment-tokens` default);
- rate: the paper's self-curation prompt (Table 1) with the generated instruction and the passage
  as its answer; at most 128 new tokens (backflow's `--rate-tokens`); the score parsed from
  `Score: N`.
backflow: `backflow run humpback --backward-model GGUF --seed-model GGUF --rounds 1` over the same
passages (no step-0 training: both models are the GGUF), `-w 2`; its time is the run's wall time
less round 1's training of M_1 (reported apart), so both sides are timed on augment + rate, model
loading included. backflow also computes a forced score when a rating has none (more work, not
less). distilabel: a `Pipeline` of `LoadDataFromDicts` -> `TextGeneration` (the backward prompt)
-> `InstructionBacktranslation` (distilabel's task for the paper's self-curation prompt), both on
`LlamaCppLLM` with the same GGUF and `n_threads`, as distilabel's documentation sets them up;
timed from `pipeline.run` until its steps are done; its rows are read from the rating step's
parquet files (distilabel 1.5.3 fails to read them back itself on this data: see
`keep_distilabel_outputs_readable`). Its rating turn has no system prompt (backflow's has the
seed tag); distilabel's template is its own rendering of the paper's prompt.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("BACKFLOW_CACHE", Path.home() / ".cache/backflow"))
BIN = Path(os.environ.get("BACKFLOW_BIN", ROOT / "target/release/backflow"))
DEFAULT_MODEL = CACHE / "model/SmolLM2-135M-Instruct.Q4_1.gguf"

# train::data::BACKWARD_PROMPT and SEED_TAG, as backflow sends them (src/train/data.rs).
BACKWARD_PROMPT = ("Below is a candidate answer to a question or instruction from an user. Write "
                   "the most likely question to which the text below would be a great answer.")
SEED_TAG = "Answer in the style of an AI Assistant."


def passages(tmp, n):
    """The first n passages `backflow segment` makes of the Python docs."""
    warc = tmp / "python-docs.warc.gz"
    subprocess.run([str(BIN), "warc-pack", str(CACHE / "pages/python3.11"), "--out", str(warc)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run([str(BIN), "segment", str(warc), "--out", str(tmp / "seg"), "-q"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = []
    for f in sorted((tmp / "seg").glob("segment-*.jsonl")):
        rows += [json.loads(line)["text"] for line in f.open()]
    if len(rows) < n:
        sys.exit(f"only {len(rows)} passages")
    return rows[:n]


def run_backflow(tmp, texts, args):
    corpus = tmp / "passages.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp / "backflow"
    cmd = [str(BIN), "run", "humpback", "--corpus", str(corpus), "--out", str(out),
           "--limit", str(len(texts)), "--backward-model", str(args.model),
           "--seed-model", str(args.model), "--model", str(args.model), "--rounds", "1",
           "--train-steps", "1", "--max-chars", "100000", "-w", str(args.threads), "-q"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    m = json.loads((out / "metrics.json").read_text())
    train = sum(r["train"]["secs"] for r in m["rounds"])
    ratings = [json.loads(line) for f in out.glob("ratings-*.jsonl") for line in f.open()]
    scored = sum(1 for r in ratings if any(x.get("score") is not None for x in r["samples"]))
    return {"wall": wall, "train": train, "secs": wall - train, "passages": m["passages"],
            "ratings": len(ratings), "peak_rss_mb": m.get("peak_rss_mb"),
            "rated_with_score": scored,
            # Per stage: rows per decode step, steps shared with the other version, model busy.
            "stages": {k: {f: round(v.get(f, 0.0), 3) for f in
                           ("mean_batch", "prefix_saved", "joint_step_share",
                                     "busy_fraction")}
                       for k, v in m.get("throughput", {}).items() if isinstance(v, dict)}}


def run_distilabel(texts, args):
    # distilabel runs each step in a process of its own, so the augment and rate LLMs decode at
    # the same time, each with `n_threads`. llama.cpp's OpenMP threads spin while they wait,
    # and two spinning pools on these 2 cores starve each other: three 362+64-token calls took
    # 625 s in each of two concurrent processes (2 threads each) against 10.6 s alone, and 19.3 s
    # with OMP_WAIT_POLICY=passive (threads that sleep), 29 s with 1 thread each (2026-12-06).
    # The peer gets the fastest of these; it must be set before llama.cpp's library loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    from distilabel.models.llms import LlamaCppLLM
    from distilabel.pipeline import Pipeline
    from distilabel.steps import LoadDataFromDicts
    from distilabel.steps.tasks import InstructionBacktranslation, TextGeneration

    def llm(max_new_tokens, sampled):
        kwargs = {"max_new_tokens": max_new_tokens}
        kwargs.update({"temperature": 0.7, "top_p": 0.9} if sampled else {"temperature": 0.0})
        return LlamaCppLLM(model_path=str(args.model), n_ctx=4096, n_gpu_layers=0,
                           extra_kwargs={"n_threads": args.threads},
                           generation_kwargs=kwargs)

    rows = [{"text": t, "backward_prompt": f"{BACKWARD_PROMPT}\n\n{t.strip()}\n\n{SEED_TAG}"}
            for t in texts]
    with Pipeline(name="backtranslation-peer", cache_dir=str(args.tmp / "distilabel-cache")) as p:
        load = LoadDataFromDicts(data=rows, batch_size=args.batch)
        augment = TextGeneration(llm=llm(64, True), template="{{ backward_prompt }}",
                                 columns=["backward_prompt"], input_batch_size=args.batch,
                                 output_mappings={"generation": "instruction"})
        rate = InstructionBacktranslation(llm=llm(128, False), input_batch_size=args.batch,
                                          input_mappings={"generation": "text"})
        load >> augment >> rate
    read_leaf_outputs = keep_distilabel_outputs_readable()
    t = time.perf_counter()
    out = p.run(use_cache=False)
    secs = read_leaf_outputs.done - t
    scores = [s for s in out.column("score").to_pylist() if s is not None]
    return {"secs": secs, "rows": out.num_rows, "scored": len(scores)}


def keep_distilabel_outputs_readable():
    """distilabel 1.5.3 cannot read back what its rating step wrote when a batch's `score` is
    null throughout (SmolLM2 rarely writes `Score: N`) and a later one holds an int: its write
    buffer keeps the first batch's schema (`score: null`), and on closing re-reads every file
    with that schema (`ArrowNotImplementedError: Unsupported cast from int64 to null`), after
    all the work is done; its `Distiset` loader fails the same way (2026-12-06, twice at 256
    passages). So the pipeline's end is patched here: the write buffer only flushes what it
    holds, and the leaf step's parquet files are read with their schemas unified. Returns the
    reader that stands in for `create_distiset`; its `done` is the time the steps finished."""
    import distilabel.pipeline.local as local
    from distilabel.pipeline.write_buffer import _WriteBuffer

    def flush_only(self):
        for step_name, rows in self._buffers.items():
            if rows:
                self._write(step_name)

    def read_leaf_outputs(data_dir, **_):
        read_leaf_outputs.done = time.perf_counter()
        return read_parquet_outputs(Path(data_dir) / "steps_outputs")

    _WriteBuffer.close = flush_only
    local.create_distiset = read_leaf_outputs
    return read_leaf_outputs


def read_parquet_outputs(folder):
    """The one leaf step's rows under `folder` (`<step>/00000.parquet`, ...), in file order,
    a column null in some files and typed in others taking the type."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    leaves = [d for d in folder.iterdir() if d.is_dir()]
    if len(leaves) != 1:
        sys.exit(f"distilabel wrote {len(leaves)} leaf step outputs, expected 1: {leaves}")
    files = sorted((f for f in leaves[0].iterdir() if f.suffix == ".parquet"),
                   key=lambda f: int(f.stem))
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--passages", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16, help="distilabel's input_batch_size")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--backflow-only", action="store_true",
                    help="measure backflow's side alone (distilabel takes hours at 256)")
    args = ap.parse_args()
    if not BIN.exists():
        sys.exit("build first: cargo build --release")
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = Path(tmp)
        texts = passages(args.tmp, args.passages)
        print(f"backflow: {len(texts)} passages", file=sys.stderr)
        bf = run_backflow(args.tmp, texts, args)
        print(f"backflow: {bf}", file=sys.stderr)
        if args.backflow_only:
            n = len(texts)
            print(f"backflow: {bf['secs']:.1f} s augment + rate of {n} passages, "
                  f"{n / bf['secs'] * 3600:.0f} passages/hour, peak RSS {bf['peak_rss_mb']} MB")
            return
        print(f"distilabel: {len(texts)} passages", file=sys.stderr)
        dl = run_distilabel(texts, args)
        print(f"distilabel: {dl}", file=sys.stderr)
    n = len(texts)
    print(f"\n{n} passages of the Python docs, {args.model.name}, {args.threads} threads, "
          f"{os.cpu_count()} cores\n")
    print("| | seconds (augment + rate) | passages/hour | rated | with a parsed score |")
    print("|---|---:|---:|---:|---:|")
    print(f"| backflow (`run humpback`, -w {args.threads}) | {bf['secs']:.1f} | "
          f"{n / bf['secs'] * 3600:.0f} | {bf['ratings']} | {bf['rated_with_score']} |")
    print(f"| distilabel + llama.cpp | {dl['secs']:.1f} | {n / dl['secs'] * 3600:.0f} | "
          f"{dl['rows']} | {dl['scored']} |")
    print(f"\nbackflow / distilabel: {dl['secs'] / bf['secs']:.2f}x passages/hour; backflow's "
          f"run {bf['wall']:.1f} s wall with M_1's training ({bf['train']:.1f} s) set apart; "
          f"peak RSS {bf['peak_rss_mb']} MB")


if __name__ == "__main__":
    main()
