#!/usr/bin/env python3
"""The official OpenAI Python client against `backflow serve` (run by tests/serve.rs):
prints one JSON object of what the client got, which the Rust test compares with backflow's own
answers to the same prompts.

    PY tests/openai_client.py BASE_URL PROMPT RAW_PROMPT
"""

import json
import sys

import openai

base, prompt, raw = sys.argv[1:4]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)
out = {"models": [m.id for m in client.models.list().data]}
model = out["models"][0]

chat = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=24)
out["chat"] = {
    "content": chat.choices[0].message.content,
    "role": chat.choices[0].message.role,
    "finish_reason": chat.choices[0].finish_reason,
    "usage": chat.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}),
}

pieces, finish, usage = [], None, None
with client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=24,
        stream=True, stream_options={"include_usage": True}) as stream:
    for c in stream:
        if c.usage is not None:
            usage = c.usage.completion_tokens
        for ch in c.choices:
            if ch.delta.content:
                pieces.append(ch.delta.content)
            if ch.finish_reason:
                finish = ch.finish_reason
out["stream"] = {"pieces": pieces, "finish_reason": finish, "completion_tokens": usage}

text = client.completions.create(model=model, prompt=raw, temperature=0, max_tokens=8)
out["completion"] = {"text": text.choices[0].text, "finish_reason": text.choices[0].finish_reason}

try:
    client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], temperature=9)
    out["bad_request"] = None
except openai.BadRequestError as e:
    out["bad_request"] = {"status": e.status_code, "message": str(e)}

print(json.dumps(out))
