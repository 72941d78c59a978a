"""Padding-free packing (`data.packing`): the samples of a micro batch in one row, with no pad token.

The loader still hands out micro batches of whole samples (so resume positions stay counted in samples and stay
exact); the adapter's collate, called with `packed=True`, concatenates them into one row (batch dim 1) and adds
`position_ids` that restart at 0 with each sample, and no `attention_mask`. transformers then keeps attention
inside each sample by itself:
- sdpa/eager: `masking_utils.find_packed_sequence_indices` turns position ids that restart into a block-diagonal
  causal mask (only when attention_mask is None and there is no cache: hence `use_cache=False` in the batch);
- flash_attention_2/3: `_is_packed_sequence` sees the restarts in a batch of one row and calls the varlen kernel
  with cu_seqlens derived from them (`prepare_fa_kwargs_from_position_ids`). vtt passes no cu_seq_lens kwargs:
  Qwen-VL forwards its kwargs to the vision tower too, which sets its own.
Qwen-VL's M-RoPE positions are made per sample (the model's own get_rope_index, models/qwen.py) and passed as
(4, 1, N): row 0 the text positions the mask is built from, rows 1-3 the temporal/height/width positions.

`PACKED_SDPA` ("sdpa_packed", registered with transformers' AttentionInterface when this module is imported) is
what a packed run uses where flash-attention is not installed: sdpa over each sample's slice of the row with
is_causal (PyTorch's own flash/efficient kernels on CUDA), O(sum of sample^2) like varlen, where plain sdpa under
the block-diagonal mask computes the whole (row x row) score matrix (a packed epoch 0.53x as fast as an unpacked
one on the tiny CPU LLaVA, benchmarks/bench_packing.py --time) and keeps a (row x row) mask. Its mask function
makes no mask for a packed row; anything not packed (padded batches, generation, vision towers) is plain sdpa.

The loss needs nothing new: the first label of every sample is IGNORE (in an unpacked causal batch the first label
is never predicted either), so the last token of sample i predicting the first of sample i+1 counts nowhere, and
the summed cross-entropy and label count of a packed micro batch equal the unpacked one's (run/loss.py).
Cost: O(tokens of the micro batch) per batch; no pad token is computed, and the number of samples per micro
batch stays fixed (`micro_batch`), so a packed row's length varies with its samples.
"""
from __future__ import annotations

import importlib.util

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

IGNORE = -100
PACKED_SDPA = "sdpa_packed"


def pack(ids: list[list[int]], labels: list[list[int]]) -> dict[str, torch.Tensor | bool]:
    """One row: input_ids and labels concatenated (each sample's first label IGNORE), position_ids restarting at
    0 per sample, use_cache False (a cache turns transformers' packed-sequence mask off)."""
    if not ids or any(len(x) == 0 for x in ids) or [len(x) for x in ids] != [len(y) for y in labels]:
        raise ValueError("pack: every sample needs as many labels as ids, and at least one token")
    flat_ids = [t for x in ids for t in x]
    flat_labels = [t for y in labels for t in [IGNORE, *y[1:]]]
    positions = [p for x in ids for p in range(len(x))]
    return {"input_ids": torch.tensor([flat_ids], dtype=torch.long),
            "labels": torch.tensor([flat_labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "use_cache": False}


def is_packed(batch: dict) -> bool:
    return "position_ids" in batch and "attention_mask" not in batch


def text_positions(batch: dict) -> torch.Tensor:
    """(rows, tokens) 1-D positions of a packed batch (row 0 of Qwen-VL's (4, 1, N) M-RoPE ids)."""
    pos = batch["position_ids"]
    return pos[0] if pos.ndim == 3 else pos


def sample_lengths(batch: dict) -> list[int]:
    """Token count of each sample of a packed batch, in order (a sample starts where its position is 0)."""
    pos = text_positions(batch).reshape(-1)
    starts = (pos == 0).nonzero().reshape(-1).tolist() + [pos.numel()]
    return [b - a for a, b in zip(starts, starts[1:])]


def batch_samples(batch: dict) -> int:
    """Samples in a collated micro batch, packed or not."""
    if is_packed(batch):
        return int((text_positions(batch) == 0).sum())
    return int(batch["input_ids"].shape[0])


def real_tokens(batch: dict) -> int:
    """Tokens that are not padding: all of a packed row, the attention mask's ones otherwise."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def attention_for_packing(configured: str | None) -> str:
    """The attention a packed run loads the model with: the configured one, else flash_attention_2 on CUDA where
    flash-attn is installed (varlen from the position ids), else PACKED_SDPA."""
    if configured:
        return configured
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return PACKED_SDPA


_last: tuple[torch.Tensor, list[tuple[int, int]] | None] | None = None  # (position ids, their bounds): per forward


def _bounds(position_ids: torch.Tensor | None, tokens: int) -> list[tuple[int, int]] | None:
    """[(start, end)] of the samples in a packed row of `tokens`, or None when the row is not packed. One host
    read per forward: every layer gets the same position_ids tensor, so the answer is kept for it."""
    global _last
    if position_ids is None or position_ids.shape[-1] != tokens or position_ids.numel() != tokens:
        return None
    if _last is not None and _last[0] is position_ids:
        return _last[1]
    starts = (position_ids.reshape(-1) == 0).nonzero().reshape(-1).tolist()
    bounds = list(zip(starts, starts[1:] + [tokens])) if len(starts) > 1 and starts[0] == 0 else None
    _last = (position_ids, bounds)
    return bounds


def sdpa_packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function: causal sdpa within each sample of a packed row (batch 1, no mask);
    plain sdpa otherwise (padded batches, generation, vision towers)."""
    bounds = _bounds(kwargs.get("position_ids"), query.shape[2]) if attention_mask is None else None
    if bounds is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    outs = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None,
                                   dropout=dropout, scaling=scaling, **kwargs)[0] for a, b in bounds]
    return torch.cat(outs, dim=1), None  # (1, tokens, heads, head_dim)


def sdpa_packed_mask(*args, attention_mask=None, **kwargs):
    """No (row x row) mask for a packed row (the attention above keeps to each sample); sdpa's mask otherwise."""
    if attention_mask is None and kwargs.get("local_size") is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(PACKED_SDPA, sdpa_packed_attention)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_packed_mask)
