"""A rank script for the launcher test of engine.generate: every rank generates from its own prompt and
stops at its own step (rank 0 after 2 new tokens, or at the end-of-sequence id passed to it; the others
after 6), GRACE first, then vanilla DeepSpeed-MoE. Each rank prints one JSON line with its continuations
and the single-process reference's, computed locally from the same checkpoint.

    uneven_generate_rank.py MODEL_DIR TRACE_FILE
"""

from __future__ import annotations

import json
import os
import sys

import torch

import ds_grace
from ds_grace.comm.collectives import end_process, shutdown_distributed, world
from ds_grace.models import load_checkpoint
from ds_grace.profiling import load_text_tokenizer

PROMPTS = ("GRACE moves experts", "two nodes", "MoE")


def _generate(model, input_ids, *, max_new_tokens: int, eos_token_id: int | None) -> list[int]:
    with torch.no_grad():
        tokens = model.generate(
            input_ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=eos_token_id,
        )
    return tokens[0, input_ids.shape[1] :].tolist()


def main() -> int:
    model_dir, trace = [arg for arg in sys.argv[1:] if not arg.startswith("--local_rank")]
    rank = int(os.environ["RANK"])
    tokenizer = load_text_tokenizer(model_dir)
    input_ids = torch.tensor([tokenizer.encode(PROMPTS[rank % len(PROMPTS)])])
    reference_model = load_checkpoint(model_dir)
    max_new_tokens = 2 if rank == 0 else 6
    eos_token_id = -1  # never produced: only the length stops the others
    if rank == 0:  # rank 0's own end-of-sequence: the first token its reference produces
        eos_token_id = _generate(reference_model, input_ids, max_new_tokens=1, eos_token_id=-1)[0]
    reference = _generate(
        reference_model, input_ids, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id
    )
    out = {"rank": rank, "reference": reference}
    configs = {
        "grace": {
            "dtype": "fp32",
            "grace": {"profile": {"trace": trace}, "communication": {"timeout_s": 60}},
        },
        "vanilla": {"dtype": "fp32", "grace": {"enabled": False}},
    }
    for mode, config in configs.items():
        engine = ds_grace.init_inference(model_dir, config=config)
        out[mode] = _generate(engine, input_ids, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)
        out[f"{mode}_world"] = world()[0]
    print(json.dumps(out), flush=True)
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    end_process(main())
