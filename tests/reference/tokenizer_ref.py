#!/usr/bin/env python3
"""Reference tokenizations for tests/tokenizer.rs, from implementations independent of ours.

SmolLM2's vocabulary and merges are read out of its GGUF with the `gguf` package and given to
Hugging Face's `tokenizers` (Rust, the library SmolLM2 was released with) with SmolLM2's own
pre-tokenizer (Digits(individual) + ByteLevel) and decoder; its chat template is evaluated by
`jinja2`. Output:

  tests/reference/smollm2_tokens.json     checked in: texts -> reference ids, rendered chats
  $CACHE/tokvec/smollm2/tokenizer.json    the same tokenizer as a Hugging Face tokenizer.json
  (+ tokenizer_config.json)               (for the from_tokenizer_json test; not checked in)

llama.cpp's own vectors (ggml-vocab-*.gguf + .inp/.out) are used as they come, by
`scripts/fetch-assets.sh tokvec`.

Run: ~/.cache/backflow/venv-tok/bin/python tests/reference/tokenizer_ref.py
(the venv: python3 -m venv ~/.cache/backflow/venv-tok &&
 ~/.cache/backflow/venv-tok/bin/pip install gguf numpy tokenizers jinja2)
"""

import json
import os
import pathlib
import sys

import gguf
import jinja2
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, AddedToken

CACHE = pathlib.Path(os.environ.get("BACKFLOW_CACHE", pathlib.Path.home() / ".cache/backflow"))
GGUF = CACHE / "model/SmolLM2-135M-Instruct.Q4_1.gguf"
HERE = pathlib.Path(__file__).resolve().parent

TEXTS = [
    "Hello world",
    "12345 3.14",
    "In 2024, 1,000,000 people paid $19.99 (≈ €18) each.",
    "naïve café 日本語 🙂",
    "  a\n\n\tb  ",
    "fn main() { let x = 1; }",
    "I'm sure you'll see they've done it, isn't it? We'd, we're, she's",
    "CAPS'S 'quoted' words",
    "def f(x):\n    return x ** 2\n\n\nprint(f(3))\n",
    "   leading spaces and trailing   ",
    "\r\nwindows\r\nlines\r\n",
    "Ünïcödé ẞ straße Ωmega ÆØÅ ½ ² ٣ ⅷ",
    "emoji 👨‍👩‍👧 and 🇫🇷 flags",
    "<|im_start|>user\nHi<|im_end|>",
    "text with <|endoftext|> inside and <repo_name>",
    "",
    " ",
    "\n",
    "Tabs\tand\u00a0non-breaking\u2003spaces",
    "Привет, мир! Γειά σου κόσμε. مرحبا بالعالم",
]


def gguf_strings(reader, key):
    field = reader.fields[key]
    return [bytes(field.parts[i]).decode("utf-8") for i in field.data]


def gguf_scalar(reader, key):
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.parts[field.data[0]]
    if field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(value).decode("utf-8")
    return value.tolist()[0]


def seed_texts():
    """A few real instructions and outputs from the cached Self-Instruct seed tasks."""
    path = CACHE / "seed/seed_tasks.jsonl"
    if not path.exists():
        return []
    out = []
    with open(path) as f:
        for i, line in enumerate(f):
            if i % 35 != 0:
                continue
            task = json.loads(line)
            out.append(task["instruction"])
            out.append(task["instances"][0]["output"])
    return out


def main():
    if not GGUF.exists():
        sys.exit(f"missing {GGUF}: run scripts/fetch-assets.sh model")
    r = gguf.GGUFReader(str(GGUF))
    tokens = gguf_strings(r, "tokenizer.ggml.tokens")
    merges = gguf_strings(r, "tokenizer.ggml.merges")
    types_field = r.fields["tokenizer.ggml.token_type"]
    types = [int(types_field.parts[i][0]) for i in types_field.data]
    template = gguf_scalar(r, "tokenizer.chat_template")
    bos = gguf_scalar(r, "tokenizer.ggml.bos_token_id")
    eos = gguf_scalar(r, "tokenizer.ggml.eos_token_id")
    assert gguf_scalar(r, "tokenizer.ggml.pre") == "smollm"

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    )

    texts = TEXTS + seed_texts()
    cases = []
    for text in texts:
        tok.encode_special_tokens = False
        with_special = tok.encode(text, add_special_tokens=False).ids
        tok.encode_special_tokens = True
        plain = tok.encode(text, add_special_tokens=False).ids
        cases.append({"text": text, "ids": plain, "ids_parse_special": with_special})
    tok.encode_special_tokens = False

    env = jinja2.Environment()
    tmpl = env.from_string(template)
    chats = []
    for messages, gen in [
        ([{"role": "system", "content": "You rate passages."},
          {"role": "user", "content": "Rate this: 1 2 3"}], True),
        ([{"role": "user", "content": "What is the capital of France?"}], True),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
          {"role": "user", "content": "Bye"}], False),
    ]:
        rendered = tmpl.render(messages=messages, add_generation_prompt=gen,
                               bos_token=tokens[bos], eos_token=tokens[eos])
        chats.append({
            "messages": messages,
            "add_generation_prompt": gen,
            "rendered": rendered,
            "ids": tok.encode(rendered, add_special_tokens=False).ids,
        })

    ref = {
        "source": "tests/reference/tokenizer_ref.py: HF tokenizers "
                  + __import__("tokenizers").__version__
                  + " on the SmolLM2-135M-Instruct GGUF vocabulary; jinja2 "
                  + jinja2.__version__ + " on its chat template",
        "vocab_size": len(tokens),
        "cases": cases,
        "chats": chats,
    }
    out = HERE / "smollm2_tokens.json"
    out.write_text(json.dumps(ref, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {out}: {len(cases)} texts, {len(chats)} chats")

    hf_dir = CACHE / "tokvec/smollm2"
    hf_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": tokens[bos],
        "eos_token": tokens[eos],
        "add_bos_token": False,
        "chat_template": template,
    }, ensure_ascii=False))
    print(f"wrote {hf_dir}/tokenizer.json")


if __name__ == "__main__":
    main()
