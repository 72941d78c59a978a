"""The training loss is a per-token mean over the whole optimizer step: the gradients the real DeepSpeed engine
applies do not depend on how the global batch is split into ranks x micro batches x accumulation steps."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import PY, REPO, make_train_shards, train_env  # noqa: E402

from vtt.trainer.models.registry import get_adapter  # noqa: E402
from vtt.trainer.models.model_config import ModelConfig  # noqa: E402
from vtt.trainer.run.dist import free_port  # noqa: E402
from vtt.trainer.run.loss import label_count, summed_token_loss  # noqa: E402
from vtt.trainer.models.presets import build_tiny  # noqa: E402

# Runs vtt-train (any launcher) and, at the first accumulation boundary, saves every rank's micro batches and
# the full fp32 gradients DeepSpeed is about to apply (safe_get_full_grad: after backward, before the step).
CAPTURE = """
import os, sys, torch
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.utils import safe_get_full_grad
from vtt.trainer import cli
from vtt.trainer.run import loop
out, batches = sys.argv[1], []
real_loss, real_step = loop.forward_loss, DeepSpeedEngine.step
def recording(engine, batch, causal):
    batches.append({k: v.detach().cpu().clone() for k, v in batch.items()})
    return real_loss(engine, batch, causal)
def step(self, *a, **k):
    if self.is_gradient_accumulation_boundary() and not getattr(self, "_dumped", False):
        full = {n: safe_get_full_grad(p) for n, p in self.module.named_parameters() if p.requires_grad}
        grads = {n: (torch.zeros_like(p) if full[n] is None else full[n]).detach().float().cpu().clone()
                 for n, p in self.module.named_parameters() if p.requires_grad}  # ZeRO-0: unused ones stay None
        torch.save({"grads": grads, "batches": batches}, f"{out}.rank{os.environ.get('RANK', '0')}")
        self._dumped = True
    return real_step(self, *a, **k)
loop.forward_loss, DeepSpeedEngine.step = recording, step
sys.argv = ["vtt-train"] + sys.argv[2:]
cli.main()
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_train_shards(tmp_path_factory.mktemp("shards") / "train", n=16, per_shard=4)


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    return build_tiny("llava", tmp_path_factory.mktemp("preset") / "llava", seed=0)


def captured(tmp, shards, preset, micro: int, accum: int, ranks: int = 1) -> list[dict]:
    """One fp32 optimizer step of the real engine; [per rank: {grads, batches}]."""
    out = tmp / f"r{ranks}m{micro}a{accum}"
    args = ["--model", "llava", "--model-path", str(preset), "--shards", str(shards), "--output-dir", str(out),
            "--micro-batch", str(micro), "--grad-accum", str(accum), "--max-steps", "1", "--precision", "fp32",
            "--save-every", "0", "--no-export", "--set", "run.save_final=false", "--set", "run.progress_bar=false",
            "--set", "data.shuffle_buffer=0", "--set", "data.interleave_shards=1",  # clips 0-3: 4 caption lengths
            "--grad-clip", "0"]  # the gradients as the loss makes them (ZeRO-0: vtt clips before engine.step)
    launch = [] if ranks == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                                    "--master_port", str(free_port())]
    script = tmp / "capture.py"
    script.write_text(CAPTURE)
    p = subprocess.run([PY, *launch, str(script), str(out / "dump"), *args], cwd=REPO, env=train_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    return [torch.load(f"{out / 'dump'}.rank{r}", weights_only=False) for r in range(ranks)]


def reference_grads(preset, batches: list[dict], per_micro_mean: bool = False) -> dict:
    """Plain torch on the same weights and micro batches: the gradient of sum(token losses) / tokens (or, for
    per_micro_mean, of the mean over micro batches of each one's token mean: the old, split-dependent loss)."""
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(preset, dtype=torch.float32).train()
    total = sum(label_count(b, causal=True) for b in batches)
    for b in batches:
        inputs = {k: v for k, v in b.items() if k != "labels"}
        loss = summed_token_loss(model(**inputs).logits, b["labels"], causal=True)
        weight = len(batches) * label_count(b, causal=True) if per_micro_mean else total
        (loss / weight).backward()
    return {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in model.named_parameters()}


def close(a: dict, b: dict, atol: float = 2e-6) -> bool:
    return all(torch.allclose(a[n], b[n], rtol=1e-4, atol=atol) for n in a)


def test_loss_function_matches_the_models_own_token_mean(preset, tmp_path, shards):
    """summed_token_loss / label_count is exactly the model's own mean loss (same shift), for both model kinds;
    seq2seq's decoder inputs built in collate equal the ones the model builds from labels."""
    from vtt.trainer.data.loader import DataConfig, build_loader
    s2s = build_tiny("seq2seq", tmp_path / "s2s", seed=0)
    for kind, path, causal in (("llava", preset, True), ("seq2seq", s2s, False)):
        adapter = get_adapter(ModelConfig(kind=kind, model_path=str(path)))
        model = adapter.load_model().eval()
        loader = build_loader(DataConfig(str(shards), decode_frames=adapter.needs_frames), adapter.collate, 3)
        batch = next(iter(loader))
        with torch.no_grad():
            own = model(**{k: v for k, v in batch.items() if k != "decoder_input_ids"})
            ours = model(**{k: v for k, v in batch.items() if k != "labels"})
        torch.testing.assert_close(ours.logits, own.logits)
        mean = summed_token_loss(ours.logits, batch["labels"], causal) / label_count(batch, causal)
        torch.testing.assert_close(mean, own.loss, rtol=1e-6, atol=1e-6)
    empty = summed_token_loss(ours.logits, torch.full_like(batch["labels"], -100), causal=False)
    assert empty.item() == 0.0  # a micro batch without label tokens adds nothing (the model's mean gives NaN)


def test_gradients_do_not_depend_on_the_batch_split(shards, preset, tmp_path):
    """micro 4 x accum 1 and micro 2 x accum 2 (one rank) and 2 ranks x micro 2 all apply the gradient of the
    per-token mean over their step's samples; the old per-micro-batch mean would not (checked: it differs)."""
    whole = captured(tmp_path, shards, preset, micro=4, accum=1)[0]
    split = captured(tmp_path, shards, preset, micro=2, accum=2)[0]
    assert len(whole["batches"]) == 1 and len(split["batches"]) == 2
    want = reference_grads(preset, whole["batches"])
    assert close(whole["grads"], want)
    assert close(split["grads"], want), max((split["grads"][n] - want[n]).abs().max().item() for n in want)
    assert close(split["grads"], whole["grads"])
    counts = [label_count(b, causal=True) for b in split["batches"]]
    assert counts[0] != counts[1], counts  # else the old loss would agree by accident
    assert not close(reference_grads(preset, split["batches"], per_micro_mean=True), want)
    ranks = captured(tmp_path, shards, preset, micro=2, accum=1, ranks=2)
    both = [b for r in ranks for b in r["batches"]]
    assert close(ranks[0]["grads"], reference_grads(preset, both))
    assert close(ranks[0]["grads"], ranks[1]["grads"], atol=0)


# ------------------------------------------------------------------ chunked cross-entropy (large vocabularies)

@pytest.mark.parametrize("weight_grad", [True, False])
def test_chunked_cross_entropy_equals_the_plain_one(weight_grad):
    """Loss and both gradients of the chunked path equal full logits + cross_entropy (several chunks, a last
    partial one; a frozen head as under LoRA gets no gradient and costs none)."""
    from vtt.trainer.run.loss import linear_cross_entropy
    g = torch.Generator().manual_seed(0)
    h0, w0 = torch.randn(37, 24, generator=g), torch.randn(500, 24, generator=g) * 0.3
    y = torch.randint(0, 500, (37,), generator=g)
    results = []
    for impl, chunk in (("plain", None), ("chunked", 8), ("chunked", None)):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_(weight_grad)
        loss = linear_cross_entropy(h, w, y, impl, chunk=chunk)
        (loss * 0.37).backward()  # a scale as in loop.train_step
        results.append((loss.detach(), h.grad, w.grad))
    (ref_loss, ref_h, ref_w) = results[0]
    assert ref_loss.dtype == torch.float32 and ref_loss > 0
    for loss, gh, gw in results[1:]:
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(gh, ref_h, rtol=1e-5, atol=1e-6)
        if weight_grad:
            torch.testing.assert_close(gw, ref_w, rtol=1e-5, atol=1e-6)
        else:
            assert gw is None
    with torch.no_grad():  # eval: the loss alone
        torch.testing.assert_close(linear_cross_entropy(h0, w0, y, "chunked", chunk=5), ref_loss)


@pytest.mark.parametrize("kind", ["seq2seq", "llava"])
def test_forward_loss_chunked_matches_full_logits(kind, preset, shards, tmp_path):
    """Through the real tiny models (the head bypassed for the forward, label rows only): the same summed
    loss and the same gradient on every trainable parameter as full logits; bf16 agrees to bf16 rounding."""
    from vtt.trainer.data.loader import DataConfig, build_loader
    from vtt.trainer.run.loss import forward_loss, output_head
    path = preset if kind == "llava" else build_tiny("seq2seq", tmp_path / "s2s", seed=0)
    adapter = get_adapter(ModelConfig(kind=kind, model_path=str(path)))
    batch = next(iter(build_loader(DataConfig(str(shards), decode_frames=adapter.needs_frames), adapter.collate,
                                   3)))
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        model = adapter.load_model().to(dtype).train()
        assert output_head(model) is model.get_output_embeddings()
        grads = {}
        for impl in ("plain", "chunked"):
            torch.manual_seed(0)  # same dropout
            model.zero_grad(set_to_none=True)
            b = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
            loss = forward_loss(model, b, adapter.causal, impl=impl)
            loss.backward()
            grads[impl] = (loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()
                                                   if p.grad is not None})
        (lp, gp), (lc, gc) = grads["plain"], grads["chunked"]
        torch.testing.assert_close(lc, lp, rtol=tol, atol=tol)
        assert gp.keys() == gc.keys() and len(gp) > 10
        scale = max(g.abs().max().item() for g in gp.values())  # some norm biases' gradients are ~1e-11
        for n in gp:
            torch.testing.assert_close(gc[n], gp[n], rtol=tol, atol=tol * scale, msg=n)
