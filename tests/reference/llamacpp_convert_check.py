#!/usr/bin/env python3
"""llama.cpp loads what backflow exports, through llama.cpp's own converter: the GGUF that
`convert_hf_to_gguf.py` makes from the HF folder `backflow export` wrote (from the Q4_1 GGUF,
dequantized to f32) must give, in llama.cpp (llama-cpp-python), the next-token logits of the
independent numpy reference over the original GGUF (tests/reference/smollm2_logits.json, see
llama_ref.py). Checks the export's tensor names, q/k layout, config.json and tokenizer files as
the converter reads them, and the converter's tokenizer (the prompts' ids re-tokenized from
text are not needed: the reference gives ids).

    tests/reference/llamacpp_convert_check.sh      # exports, converts, then runs this
    PY llamacpp_convert_check.py CONVERTED.gguf
"""

import json
import os
import sys

import numpy as np
from llama_cpp import Llama

HERE = os.path.dirname(os.path.abspath(__file__))


def open_llama(path):
    """llama.cpp on `path` with an f32 KV cache (its default is f16), so that only arithmetic
    order and the weights' own rounding differ from the reference."""
    return Llama(model_path=path, n_ctx=512, n_batch=512, logits_all=True, n_threads=2,
                 type_k=0, type_v=0, verbose=False)


def worst_reference_diff(llm, label):
    """The largest |logit difference| (top-20 and sampled logits) between `llm` and the numpy
    reference (smollm2_logits.json) over its prompts, printed per prompt; exits when the argmax
    differs on one."""
    ref = json.load(open(os.path.join(HERE, "smollm2_logits.json")))
    worst = 0.0
    for p in ref["prompts"]:
        llm.reset()
        llm.eval(p["ids"])
        logits = np.asarray(llm.scores[len(p["ids"]) - 1], dtype=np.float64)
        diff = float(np.max(np.abs(logits[p["top20_ids"]] - np.array(p["top20_values"]))))
        sample = logits[:: p["sample_stride"]][: len(p["sample"])]
        diff = max(diff, float(np.max(np.abs(sample - np.array(p["sample"])))))
        argmax_ok = int(np.argmax(logits)) == p["argmax"]
        worst = max(worst, diff)
        print(f"  {p['name']:<14} {label}, max |diff| vs the f64 reference: {diff:.2e}  "
              f"argmax equal: {argmax_ok}")
        if not argmax_ok:
            sys.exit(f"{label}: argmax differs on {p['name']}")
    return worst


def main():
    worst = worst_reference_diff(open_llama(sys.argv[1]), "llama.cpp on the converted export")
    print(f"worst logit difference: {worst:.2e}")
    # llama.cpp computes in f32 with its own kernel order; the reference is float64.
    if worst > 1e-3:
        sys.exit("MISMATCH")


if __name__ == "__main__":
    main()
