"""Peak memory of the loss (forward + backward) for a large vocabulary: full logits vs the chunked path.

    .venv/bin/python benchmarks/bench_ce_memory.py                       # NLLB's 256,206 tokens, ~1-2 min on CPU
    .venv/bin/python benchmarks/bench_ce_memory.py --vocab 151936        # Qwen2.5's vocabulary

Each implementation runs in its own process (`vtt.trainer.run.loss.linear_cross_entropy` on random hidden states
and head weight, both trainable as in a full fine-tune), so peaks do not mix. On CPU the figure is the growth of
the process's peak RSS over what it held after allocating and touching the inputs; on CUDA it is
max_memory_allocated above the inputs. The loss and the two gradients of each path are checked against the
plain path's (same seed) so a fast wrong answer cannot pass as a saving.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def one(impl: str, tokens: int, hidden: int, vocab: int, dtype: str, device: str, out: str) -> None:
    import torch

    from vtt.trainer.run.loss import linear_cross_entropy
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(tokens, hidden, generator=g) * 1.0).to(device, dt).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * hidden ** -0.5).to(device, dt).requires_grad_()
    y = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = peak_rss_gb()
    t0 = time.perf_counter()
    loss = linear_cross_entropy(h, w, y, impl)
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    else:
        peak = peak_rss_gb() - base
    torch.save({"loss": loss.detach().float(), "gh": h.grad.float(), "gw": w.grad.float(), "peak_gb": peak,
                "s": time.perf_counter() - t0}, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1024, help="label tokens in the micro batch (e.g. 16 x 64)")
    ap.add_argument("--hidden", type=int, default=256, help="the logits' size does not depend on it")
    ap.add_argument("--vocab", type=int, default=256206)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--impls", default="plain,chunked")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--to", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        return one(a.one, a.tokens, a.hidden, a.vocab, a.dtype, a.device, a.to)
    import tempfile

    import torch
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for impl in a.impls.split(","):
            out = f"{tmp}/{impl}.pt"
            subprocess.run([sys.executable, __file__, "--one", impl, "--to", out, "--tokens", str(a.tokens),
                            "--hidden", str(a.hidden), "--vocab", str(a.vocab), "--dtype", a.dtype,
                            "--device", a.device], check=True)
            res[impl] = torch.load(out)
    ref = res[a.impls.split(",")[0]]
    logits_gb = a.tokens * a.vocab * 4 / 2**30
    print(f"loss forward+backward, {a.tokens} tokens x vocab {a.vocab} (fp32 logits alone {logits_gb:.2f} GiB), "
          f"hidden {a.hidden}, {a.dtype} on {a.device}:")
    for impl, r in res.items():
        ok = (torch.allclose(r["loss"], ref["loss"], rtol=1e-4) and torch.allclose(r["gh"], ref["gh"], atol=1e-5)
              and torch.allclose(r["gw"], ref["gw"], atol=1e-5))
        print("BENCH_CE " + json.dumps({"impl": impl, "peak_gb": round(r["peak_gb"], 3), "s": round(r["s"], 2),
                                        "loss": float(r["loss"]), "matches_first": bool(ok)}))


if __name__ == "__main__":
    main()
