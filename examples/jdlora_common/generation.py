"""Greedy generation of a batch of chat prompts, cut at the end of each row's turn."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from .tasks import END_OF_TURN


@torch.no_grad()
def greedy_generate(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, **kwargs: Any
) -> tuple[list[list[int]], float]:
    """Greedy continuations (token ids up to and including the first end-of-turn) of a left-padded batch."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation continues at the right end of every row
    try:
        batch = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = old_side
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    eos = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    t0 = time.perf_counter()
    out = model.generate(
        **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, eos_token_id=eos, **kwargs
    )
    seconds = time.perf_counter() - t0
    results = []
    for seq in out[:, batch["input_ids"].shape[1] :].tolist():
        results.append(seq[: seq.index(eos) + 1] if eos in seq else seq)
    return results, seconds
