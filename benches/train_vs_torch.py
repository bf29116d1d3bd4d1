#!/usr/bin/env python3
"""Benchmark: training tokens/s (forward, backward, optimizer step) of SmolLM2-135M, LoRA r=8 on
all projections and full finetuning, at a fixed sequence length, on this machine's cores:
`backflow train` beside PyTorch (CPU, from PyPI; LoRA through PEFT) doing the same step on the
same model in the same run, with the ratio.

    python3 -m venv ~/.cache/backflow/venv-torch
    ~/.cache/backflow/venv-torch/bin/pip install torch==2.5.1 transformers==4.46.3 peft==0.13.2
    cargo build --release
    ~/.cache/backflow/venv-torch/bin/python benches/train_vs_torch.py [--seq 128] [--batch 8] [--steps 4]

Both sides: batch x seq real tokens per step (backflow: pairs whose outputs are long enough to be
cut at --seq, so every example is exactly --seq tokens), AdamW (weight decay 0.1), clipping at
1.0, f32, `--threads` threads (torch.set_num_threads; backflow's rayon pool). The first step of
each side is a warm-up and not counted. PyTorch runs on the HF folder backflow exports from the
GGUF (learning rate 0, so the weights are the same), in train mode, loss over all tokens
(backflow masks the prompt in the loss but computes every position, as PyTorch does).
"""
import argparse, json, os, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("BACKFLOW_CACHE", Path.home() / ".cache/backflow"))
BIN = ROOT / "target/release/backflow"
GGUF = CACHE / "model/SmolLM2-135M-Instruct.Q4_1.gguf"


def backflow_train(data, out, args, mode):
    flags = ["--full"] if mode == "full" else ["--lora-rank", "8"]
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    subprocess.run([BIN, "train", "--model", GGUF, "--data", data, "--out", out, *flags,
                    "--steps", str(args.steps + 1), "--batch-size", str(args.batch),
                    "--max-len", str(args.seq), "--lora-dropout", "0", "--quiet"],
                   check=True, env=env, stderr=subprocess.DEVNULL)
    steps = [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    timed = steps[1:]
    return sum(s["tokens"] for s in timed) / sum(s["secs"] for s in timed)


def torch_train(hf_dir, args, mode):
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                            "down_proj"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4 if mode == "lora" else 1e-5, weight_decay=0.1)
    vocab = model.config.vocab_size
    times = []
    for step in range(args.steps + 1):
        ids = torch.randint(0, vocab, (args.batch, args.seq))
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return args.batch * args.seq * args.steps / sum(times[1:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Long outputs: every example is cut at --seq tokens.
        text = " ".join(f"word{i} of a long answer about training speed" for i in range(200))
        data = tmp / "long.jsonl"
        data.write_text("\n".join(json.dumps({"instruction": f"Question {i}?", "output": text})
                                  for i in range(args.batch * (args.steps + 1))) + "\n")
        # The GGUF's weights as an HF folder, written by backflow (learning rate 0).
        hf = tmp / "hf"
        subprocess.run([BIN, "train", "--model", GGUF, "--data", data, "--out", hf, "--full",
                        "--steps", "1", "--lr", "0", "--lr-end", "0", "--batch-size", "1",
                        "--max-len", "32", "--quiet"], check=True, stderr=subprocess.DEVNULL)
        rows = []
        for mode in ["lora", "full"]:
            b = backflow_train(data, tmp / f"bf-{mode}", args, mode)
            t = torch_train(hf, args, mode)
            rows.append((mode, b, t))
    print(f"\nSmolLM2-135M, seq {args.seq}, batch {args.batch}, {args.steps} timed steps, "
          f"{args.threads} threads\n")
    print("| mode | backflow tok/s | PyTorch tok/s | ratio |")
    print("|---|---:|---:|---:|")
    for mode, b, t in rows:
        print(f"| {mode} | {b:.0f} | {t:.0f} | {b / t:.2f} |")


if __name__ == "__main__":
    main()
