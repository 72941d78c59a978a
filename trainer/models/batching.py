"""Token-id batches: padding for collate and generation, and the one batched greedy generate every adapter uses
(each adapter only builds its prompts and vision inputs)."""
from __future__ import annotations

import torch

from vtt.trainer.models.model_io import model_device, unwrap


def pad_right(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def pad_left(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([[value] * (width - len(s)) + s for s in seqs], dtype=torch.long)


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                    inputs: dict[str, torch.Tensor] | None = None, encoder_decoder: bool = False,
                    **options) -> list[str]:
    """Greedy (do_sample=False) answers to token-id prompts in one generate call, decoded without special tokens
    and stripped, one per prompt.

    Decoder-only: the prompts are left-padded (every answer starts right after its prompt), the tokenizer's pad id
    is passed, and the prompt columns are cut from the output. Encoder-decoder: the prompts are the encoder's
    sources, right-padded; the output holds the decoder's tokens only. `inputs` (pixel values, grids, token types)
    go to the model's device, floating ones in its parameters' dtype; `options` go to generate as they are (e.g.
    forced_bos_token_id). The model (a DeepSpeed engine or a bare module) is in eval mode for the call and back in
    its previous mode after. Cost: one forward per new token over the batch, prompts padded to the longest."""
    module, dev = unwrap(model), model_device(model)
    pad = tokenizer.pad_token_id
    padded = pad_right if encoder_decoder else pad_left
    dtype = next(module.parameters()).dtype
    kwargs = {k: v.to(dev, dtype=dtype) if v.is_floating_point() else v.to(dev) for k, v in (inputs or {}).items()}
    if not encoder_decoder:
        kwargs["pad_token_id"] = pad
    was_training = module.training
    module.eval()
    try:
        out = module.generate(input_ids=padded(prompts, pad).to(dev),
                              attention_mask=padded([[1] * len(p) for p in prompts], 0).to(dev),
                              max_new_tokens=max_new_tokens, do_sample=False, **kwargs, **options)
    finally:
        module.train(was_training)
    if not encoder_decoder:
        out = out[:, max(len(p) for p in prompts):]
    return [x.strip() for x in tokenizer.batch_decode(out, skip_special_tokens=True)]
