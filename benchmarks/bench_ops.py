"""Operator count per optimizer step: vtt-train's step against a plain PyTorch loop, on CPU, as a proxy for the
kernel launches a GPU pays for on a short step.

On a GPU, a step of a small model is often bound by launch latency (~5-10 us of host work per kernel), not by
FLOPs: NLLB-600M at micro 16 ran at 0.81x the plain loop (BENCHMARKS.md, gpu_check). The count of aten
operators one step dispatches is the same on CPU as on CUDA for the same model and optimizer settings, so it can
be measured here. Each side runs bench_step.py's own step (VttSide: `loop.train_step` on the DeepSpeed engine vtt
builds; PlainSide: the adapter's model, torch AdamW, clip_grad_norm_, autocast for bf16) under a
TorchDispatchMode that counts every operator; view-only operators (view, t, transpose, detach, ...) launch no
kernel and are left out. Both optimizers are switched to torch's fused AdamW (what CUDA runs; on CPU vtt and
the plain loop otherwise take the multi-tensor one, whose step counter reads are host syncs).

The model: the tiny seq2seq preset with NLLB-600M's layer structure (12 + 12 layers, 4 heads, d_model 64): the
number of parameter tensors (~520), not their size, sets the per-tensor work. Sides:
  plain          the plain loop (fp32 master weights + bf16 autocast)
  vtt autocast   vtt-train's default for a bf16 full fine-tune on one process (deepspeed.autocast)
  vtt bf16       DeepSpeed's bf16 (`--set deepspeed.autocast=false`): bf16 weights, BF16_Optimizer, ZeRO-1

    .venv/bin/python benchmarks/bench_ops.py            # ~1 min
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import bench_step  # noqa: E402

VIEWS = {"view", "t", "transpose", "detach", "unsqueeze", "squeeze", "expand", "as_strided", "alias",
         "_unsafe_view", "slice", "select", "permute", "split", "split_with_sizes", "unbind", "_reshape_alias",
         "lift_fresh", "narrow", "diagonal", "unflatten", "view_as_real", "view_as_complex"}
SIDES = {"plain": None, "vtt autocast": "true", "vtt bf16": "false"}  # deepspeed.autocast per vtt side


class Count(TorchDispatchMode):
    """Counts the operators dispatched inside it, by name."""

    def __init__(self):
        super().__init__()
        self.n: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def nllb_structured(out: Path, layers: int = 12) -> Path:
    """The tiny seq2seq preset re-made with `layers` encoder and decoder layers (random weights, same tokenizer)."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    from vtt.trainer.models.presets import build_tiny
    tiny = Path(build_tiny("seq2seq", out / "tiny"))
    cfg = AutoConfig.from_pretrained(tiny)
    cfg.encoder_layers = cfg.decoder_layers = layers
    torch.manual_seed(0)
    dst = out / f"seq2seq-{layers}x{layers}"
    shutil.copytree(tiny, dst, dirs_exist_ok=True)
    AutoModelForSeq2SeqLM.from_config(cfg).save_pretrained(dst)
    return dst


def fused_everywhere() -> None:
    """Both sides on torch's fused AdamW, as on CUDA."""
    from vtt.trainer.run import ds_config as dsc
    params = dsc._optimizer_params

    def fused(s, optim, device):
        p = params(s, optim, device)
        p.pop("foreach", None)
        return {**p, "fused": True} if s.torch_adam else p
    dsc._optimizer_params = fused


def count_side(name: str, flags: list[str], steps: int = 3) -> dict:
    from vtt.trainer.run.dist import init_distributed
    from vtt.trainer.run.ds_engine import param_groups
    autocast = SIDES[name]
    cfg = bench_step.config_from_flags(flags + (["--set", f"deepspeed.autocast={autocast}"] if autocast else []))
    s = bench_step.Setup(cfg, steps * 2)
    device = init_distributed(s.env, 30)
    groups = [s.batches[i:i + s.accum] for i in range(0, len(s.batches) - s.accum + 1, s.accum)]
    if autocast is None:
        side = bench_step.PlainSide(s, device)
        o = s.plan.cfg.optim
        side.opt = torch.optim.AdamW(param_groups(side.model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps,
                                     fused=True)
    else:
        side = bench_step.VttSide(s, device)
    side.step(groups[0])  # warm-up: optimizer states, caches
    counts = []
    for g in groups[1:steps + 1]:
        c = Count()
        with c:
            side.step(g)
        counts.append(c.n)
    n = counts[-1]
    kernels = {k: v for k, v in n.items() if k not in VIEWS}
    tensors = sum(1 for p in (side.model if autocast is None else side.engine.module).parameters() if p.requires_grad)
    return {"side": name, "ops": sum(n.values()), "kernel_ops": sum(kernels.values()),
            "host_syncs": n.get("_local_scalar_dense", 0), "trainable_tensors": tensors,
            "zero_stage": None if autocast is None else s.plan.resolved.zero_stage,
            "same_each_step": len({sum(c.values()) for c in counts}) == 1,
            "top": sorted(kernels.items(), key=lambda kv: -kv[1])[:8]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12, help="encoder and decoder layers (NLLB-600M: 12)")
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--side", help="one side only (run in its own process by default)")
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vtt-bench-ops-"))
    if a.side:
        shards, model = Path(os.environ["BENCH_OPS_SHARDS"]), Path(os.environ["BENCH_OPS_MODEL"])
        flags = [*bench_step.CASES["seq2seq"], "--model-path", str(model), "--micro-batch", str(a.micro),
                 "--precision", "bf16", "--shards", str(shards), "--output-dir", str(work / "run"),
                 "--set", "run.progress_bar=false", "--max-steps", "1000"]
        fused_everywhere()
        print("BENCH_OPS " + json.dumps(count_side(a.side, [f for f in flags if f != "--preset" and f != "tiny"])),
              flush=True)
        return
    env = dict(os.environ, BENCH_OPS_SHARDS=str(bench_step.make_shards(work)),
               BENCH_OPS_MODEL=str(nllb_structured(work, a.layers)))
    rows = []
    for side in SIDES:  # each side in its own process: DeepSpeed keeps one process group per process
        import subprocess
        out = subprocess.run([sys.executable, __file__, "--side", side, "--micro", str(a.micro)], env=env,
                             capture_output=True, text=True)
        line = [x for x in out.stdout.splitlines() if x.startswith("BENCH_OPS ")]
        if not line:
            raise SystemExit(f"{side}: no result\n{out.stderr[-3000:]}")
        rows.append(json.loads(line[0].split(" ", 1)[1]))
    print(f"{'side':<14} {'kernel ops':>10} {'all ops':>8} {'host syncs':>10} {'tensors':>7} top kernel ops")
    for r in rows:
        print(f"{r['side']:<14} {r['kernel_ops']:>10} {r['ops']:>8} {r['host_syncs']:>10} "
              f"{r['trainable_tensors']:>7} {r['top'][:5]}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
