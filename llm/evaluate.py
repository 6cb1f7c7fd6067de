"""Perplexity on non-overlapping windows of a token stream."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm


@torch.no_grad()
def perplexity(model: nn.Module, sequences: Tensor, batch_size: int = 8, device=None,
               dtype: Optional[torch.dtype] = None, progress: bool = True) -> float:
    """exp(mean next-token NLL) over every predicted token of every window in `sequences` (n, T)."""
    device = device or next(model.parameters()).device
    total, count = 0.0, 0
    it = range(0, len(sequences), batch_size)
    for i in tqdm(it, desc="perplexity", disable=not progress, leave=False):
        batch = sequences[i: i + batch_size].to(device)
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            logits = model(input_ids=batch).logits
        nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                              reduction="sum")
        total += float(nll)
        count += batch[:, 1:].numel()
    return math.exp(total / count)
