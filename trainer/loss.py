"""The training loss: a per-token mean over the whole optimizer step (all micro batches of all ranks).

A model's own `.loss` is a token mean per micro batch; averaging those over accumulation steps and ranks weighs a
token by 1/(its micro batch's token count), so the same global batch split 4x1 or 2x2 gives different gradients.
Here each micro batch contributes its *summed* token cross-entropy, scaled by world / (label tokens of the step
on all ranks): DeepSpeed's data-parallel mean then yields exactly sum / global tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # label value of prompt, padding and source tokens


def label_count(batch: dict, causal: bool) -> int:
    """Tokens that carry a loss; a causal model predicts token t+1 from t, so its first label never counts."""
    labels = batch["labels"][:, 1:] if causal else batch["labels"]
    return int((labels != IGNORE).sum())


def summed_token_loss(logits: torch.Tensor, labels: torch.Tensor, causal: bool) -> torch.Tensor:
    """Sum (not mean) of the cross-entropy over label tokens, in fp32 whatever the compute dtype. Only the label
    positions are upcast (a video prompt's hundreds of positions are not: less memory than the model's own loss)."""
    if causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
    labels = labels.to(logits.device)
    keep = labels != IGNORE
    return F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum")


def forward_loss(engine, batch: dict, causal: bool) -> torch.Tensor:
    """Summed token loss of one micro batch. Labels stay out of the forward: the model would compute (and
    upcast logits for) a second, mean-reduced loss; seq2seq batches carry decoder_input_ids instead."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return summed_token_loss(engine(**inputs).logits, batch["labels"], causal)


def step_scale(world_size: int, global_tokens: int) -> float:
    """Factor for each micro batch's summed loss before engine.backward(..., scale_wrt_gas=False), so that the
    mean over ranks of the accumulated gradients is the gradient of sum / global_tokens."""
    return world_size / max(global_tokens, 1)
