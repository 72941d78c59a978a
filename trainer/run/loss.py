"""The training loss: a per-token mean over the whole optimizer step (all micro batches of all ranks).

A model's own `.loss` is a token mean per micro batch; averaging those over accumulation steps and ranks weighs a
token by 1/(its micro batch's token count), so the same global batch split 4x1 or 2x2 gives different gradients.
Here each micro batch contributes its *summed* token cross-entropy, scaled by world / (label tokens of the step
on all ranks): DeepSpeed's data-parallel mean then yields exactly sum / global tokens.

Large vocabularies (NLLB 256k, Qwen 152k): the model's LM head is not run over every position. `forward_loss`
asks the model for its last hidden states (the head's Linear is bypassed for that forward), keeps the label
positions only, and computes the loss from those and the head's weight in row chunks (`linear_cross_entropy`):
the full [tokens, vocab] logits never exist, neither in the compute dtype nor in fp32, and the head's matmul
runs on label tokens only (a video prompt's hundreds of positions cost nothing there). Liger's fused kernel
is used instead on CUDA where `liger_kernel` is installed. Models whose forward does more than `lm_head(h)`
(a logits bias, soft-capping), a head that is not a plain Linear, and ZeRO-3 (the head's weight is partitioned
outside its own forward) take the plain path: full logits, then the same summed cross-entropy.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from vtt.trainer.models.model_io import unwrap

IGNORE = -100  # label value of prompt, padding and source tokens
# Families whose forward computes logits as exactly `self.lm_head(hidden)` and nothing else (checked in
# transformers 5.x: M2M100/NLLB, Llama-family LLaVA, Qwen2/2.5/3-VL).
PLAIN_HEAD_MODELS = ("m2m_100", "nllb_moe", "llava", "llava_next", "llava_next_video", "llava_onevision",
                     "video_llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llama", "qwen2", "qwen3")
CHUNK_BYTES = 256 * 2**20  # fp32 logits of one chunk: 256 MiB -> ~260 rows at a 256k vocabulary


def label_count(batch: dict, causal: bool) -> int:
    """Tokens that carry a loss; a causal model predicts token t+1 from t, so its first label never counts."""
    return int(label_mask(batch["labels"], causal).sum())


def label_mask(labels: torch.Tensor, causal: bool) -> torch.Tensor:
    return (labels[:, 1:] if causal else labels) != IGNORE


def summed_token_loss(logits: torch.Tensor, labels: torch.Tensor, causal: bool) -> torch.Tensor:
    """Sum (not mean) of the cross-entropy over label tokens, in fp32 whatever the compute dtype. Only the label
    positions are upcast (a video prompt's hundreds of positions are not: less memory than the model's own loss)."""
    if causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
    labels = labels.to(logits.device)
    keep = labels != IGNORE
    return F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum")


class _ChunkedLinearCE(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, label_i), computed chunk by chunk; the gradients are computed in the same
    pass (as Liger's fused kernel does) so backward is a multiply: nothing of size vocab x tokens is kept.
    Logits are formed in the inputs' dtype and upcast per chunk, like the plain path's `lm_head(h).float()`."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight) if want_w else None
        for i in range(0, hidden.shape[0], chunk):
            h, y = hidden[i:i + chunk], labels[i:i + chunk]
            logits = (h @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if want_h or want_w:
                d = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                d[torch.arange(len(y), device=d.device), y] -= 1.0
                d = d.to(hidden.dtype)
                if want_h:
                    grad_h[i:i + chunk] = d @ weight
                if want_w:
                    grad_w.addmm_(d.t(), h)
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        """In place: a second copy of the head's gradient would be the largest tensor here (backward runs once;
        retain_graph=True is not supported)."""
        grad_h, grad_w = ctx.saved_tensors
        for g in (grad_h, grad_w):
            if g is not None:
                g.mul_(grad_out.to(g.dtype))
        return grad_h, grad_w, None, None


def chunk_rows(vocab: int, budget: int = CHUNK_BYTES) -> int:
    return max(16, budget // (4 * vocab))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         impl: str = "chunked", chunk: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T` against labels (no IGNORE values: select label rows first).
    impl: "chunked" (PyTorch, any device; peak ~chunk x vocab fp32 instead of tokens x vocab), "liger"
    (liger_kernel's fused CUDA kernel), "plain" (full logits; the reference)."""
    if hidden.shape[0] == 0:
        return (hidden.sum() + weight.sum()).float() * 0.0  # keeps the graph: every rank runs backward alike
    if impl == "plain":
        return F.cross_entropy((hidden @ weight.t()).float(), labels, reduction="sum")
    if impl == "liger":
        # optional: liger_kernel
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        return LigerFusedLinearCrossEntropyLoss(reduction="sum")(weight, hidden, labels).float()
    if impl != "chunked":
        raise ValueError(f"unknown cross-entropy implementation {impl!r}")
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):  # as autocast would run the head's matmul; autograd casts the grads back
        dt = torch.get_autocast_dtype(kind)
        hidden, weight = hidden.to(dt), weight.to(dt)
    return _ChunkedLinearCE.apply(hidden, weight, labels, chunk or chunk_rows(weight.shape[0]))


def liger_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        # optional: liger_kernel
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _model_of(engine):
    model = unwrap(engine)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def output_head(engine) -> torch.nn.Linear | None:
    """The LM head when the chunked loss applies to this model (see the module docstring), else None."""
    model = _model_of(engine)
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get else None
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    if getattr(getattr(model, "config", None), "model_type", None) not in PLAIN_HEAD_MODELS:
        return None
    if hasattr(head.weight, "ds_id") and getattr(head.weight, "ds_status", None) is not None:  # ZeRO-3
        return None
    return head


@contextlib.contextmanager
def hidden_from_head(head: torch.nn.Linear):
    """For one forward, the head returns its input: the model's `.logits` are the last hidden states."""
    head.forward = lambda x: x  # an instance attribute shadows the class's forward; hooks still run
    try:
        yield
    finally:
        del head.forward


def forward_loss(engine, batch: dict, causal: bool, impl: str | None = None) -> torch.Tensor:
    """Summed token loss of one micro batch. Labels stay out of the forward: the model would compute (and
    upcast logits for) a second, mean-reduced loss; seq2seq batches carry decoder_input_ids instead.
    impl None: liger on CUDA where installed, else chunked, or plain where the head cannot be bypassed."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    head = output_head(engine) if impl != "plain" else None
    if head is None:
        return summed_token_loss(engine(**inputs).logits, batch["labels"], causal)
    with hidden_from_head(head):
        hidden = engine(**inputs).logits
    labels = batch["labels"].to(hidden.device)
    if causal:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    keep = labels != IGNORE
    impl = impl or ("liger" if liger_available(hidden.device) else "chunked")
    return linear_cross_entropy(hidden[keep], head.weight, labels[keep], impl)


def step_scale(world_size: int, global_tokens: int) -> float:
    """Factor for each micro batch's summed loss before engine.backward(..., scale_wrt_gas=False), so that the
    mean over ranks of the accumulated gradients is the gradient of sum / global_tokens."""
    return world_size / max(global_tokens, 1)
