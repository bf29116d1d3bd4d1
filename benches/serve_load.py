#!/usr/bin/env python3
"""Load test of `backflow serve` on loopback: N concurrent clients, each sending chat requests
back to back for T seconds (prompts drawn from the seed tasks when given, else a fixed set).
Every request must be answered (200) or refused with a status (503 when the server is full);
prints a table: requests by status, p50/p99 latency of answered ones, completion tokens/s.

    backflow serve --model SmolLM2-135M-Instruct.Q4_1.gguf --port 8080 [--max-in-flight 16] &
    python3 benches/serve_load.py [--url http://127.0.0.1:8080] [--clients 32] [--seconds 30]
        [--max-tokens 32] [--seed-tasks seed_tasks.jsonl]

Standard library only (http.client), so the client costs the server's 2 cores as little as it can.
"""

import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.parse

PROMPTS = [
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in one paragraph.",
    "List four prime numbers.",
    "How do I reverse a list in Python?",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seed-tasks")
    a = ap.parse_args()
    prompts = PROMPTS
    if a.seed_tasks:
        prompts = [json.loads(l)["instruction"] for l in open(a.seed_tasks) if l.strip()]
    u = urllib.parse.urlparse(a.url)
    lock = threading.Lock()
    statuses, latencies, tokens = {}, [], [0]
    deadline = time.monotonic() + a.seconds

    def client(i):
        n = i
        while time.monotonic() < deadline:
            body = json.dumps({"messages": [{"role": "user", "content": prompts[n % len(prompts)]}],
                               "max_tokens": a.max_tokens, "temperature": 0.7, "seed": n})
            n += a.clients
            t0 = time.monotonic()
            try:
                c = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
                c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
                r = c.getresponse()
                data = r.read()
                status = r.status
                c.close()
            except Exception as e:  # a request that got no status at all is what must not happen
                status = f"no answer ({type(e).__name__})"
                data = b""
            dt = time.monotonic() - t0
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    latencies.append(dt)
                    tokens[0] += json.loads(data)["usage"]["completion_tokens"]
            if status == 503:
                time.sleep(0.2)

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    lat = sorted(latencies)
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")
    print(f"| clients | seconds | answered | refused (503) | other | p50 s | p99 s | completion tokens/s |")
    print(f"|---:|---:|---:|---:|---:|---:|---:|---:|")
    other = sum(v for k, v in statuses.items() if k not in (200, 503))
    print(f"| {a.clients} | {wall:.0f} | {statuses.get(200, 0)} | {statuses.get(503, 0)} | {other} | "
          f"{p(0.5):.2f} | {p(0.99):.2f} | {tokens[0] / wall:.1f} |")
    if other:
        print("statuses:", statuses)
        raise SystemExit("some requests got neither an answer nor a refusal")


if __name__ == "__main__":
    main()
