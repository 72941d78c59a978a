"""Step benchmark: vtt-train's optimizer step vs a plain PyTorch loop on the same batches and the same model.

vtt side: the real thing - `plan.prepare` + `engine.build_engine` (DeepSpeed with the config vtt-train would
generate) and `loop.train_step`, the function vtt-train's loop calls once per optimizer step (its host syncs,
collectives, NaN check and loss scaling included).
plain side: the adapter's `load_model` (same LoRA targets, checkpointing, frozen parts, same seed), torch AdamW
(fused on CUDA), fp32 master weights + bf16 autocast when the run is bf16, `clip_grad_norm_`, the same
micro batches, the same loss function (`loss.forward_loss`: the summed token loss over the step's label tokens),
no DeepSpeed, no host sync.

Both take the same batches from vtt's loader + the adapter's collate, read before timing (prefetched), so the
ratio is the step's cost alone. Single steps alternate between the two sides (which goes first alternates too),
so a busy machine slows both alike; the ratio printed is median(plain step) / median(vtt step) over all rounds
(>= 0.9: vtt's step within ~1.1x of the plain loop), with each round's ratio and the ratio of the fastest steps
beside it to show the spread.

    .venv/bin/python benchmarks/bench_step.py                 # both tiny CPU cases, ~2-4 min on 2 busy cores
    .venv/bin/python benchmarks/bench_step.py --cases seq2seq --profile vtt   # cProfile of vtt's steps
    .venv/bin/python benchmarks/bench_step.py --name x -- <vtt-train flags>   # any run (gpu_check uses this)
    .venv/bin/python benchmarks/bench_step.py --world 2       # two data-parallel ranks (gloo on CPU)

Several ranks (`--world N`): N processes on this machine, each reading its own rank's batches; vtt's side is
its DeepSpeed engine over N ranks (the ZeRO stage it picks, or `--zero-stage`), the plain side the same loop
under torch DistributedDataParallel (gradient all-reduce overlapped with backward, `no_sync` while
accumulating) plus one all-reduce of the step's label-token count, which a per-token mean over the global
batch needs. Rank 0 prints the line; its times are the step's (every step waits on the slowest rank).

Prints one JSON line per case (`BENCH_STEP {...}`) with step times, the ratio and peak memory (CUDA).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

# The tiny CPU cases of issue 21 (vtt-train flags; --shards and --output-dir are added).
CASES = {
    "seq2seq": ["--model", "seq2seq", "--preset", "tiny", "--micro-batch", "16", "--lr", "1e-3",
                "--set", "model.target_template={description_fr}", "--set", "model.src_lang=eng_Latn",
                "--set", "model.tgt_lang=fra_Latn", "--set", "model.max_source_len=32",
                "--set", "model.max_target_len=32"],
    "llava_lora": ["--model", "llava", "--preset", "tiny", "--micro-batch", "4", "--lora", "--lr", "2e-4"],
}


def log(msg: str) -> None:
    if os.environ.get("RANK", "0") != "0":
        return
    print(f"[bench_step {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_shards(out: Path, n: int = 48, size: int = 64) -> Path:
    """vtt-prep's own sample clips (English + French captions) -> real shards of 4 frames."""
    from vtt.pipeline.config import PrepConfig
    from vtt.pipeline.run import run_extract
    from vtt.pipeline.sample_data import make_sample_data
    if (out / "shards" / "index.json").is_file():
        return out / "shards"
    make_sample_data(out / "data", n_train=n, n_heldout=0, seed=0)
    run_extract(PrepConfig(data_dir=out / "data" / "train", out_dir=out / "shards", num_frames=4,
                           size=(size, size), workers=2, quiet=True))
    return out / "shards"


def config_from_flags(args: list[str]):
    """The TrainConfig vtt-train builds from these flags (its own click parser and precedence rules)."""
    from vtt.trainer import cli
    from vtt.trainer.config import load_config
    params = cli.main.make_context("vtt-train", list(args)).params
    return load_config(params.pop("config_file"), cli.overrides_from_flags(params, params.pop("sets")))


class Setup:
    """What both sides share: the config, the adapter and the prefetched micro batches."""

    def __init__(self, cfg, n_batches: int):
        from vtt.trainer.models.registry import get_adapter
        from vtt.trainer.data.loader import build_loader
        from vtt.trainer.run.dist import dist_env
        from vtt.trainer.run.plan import data_config_for, ensure_preset, prepare
        ensure_preset(cfg)
        self.adapter = get_adapter(cfg.model)
        self.env = dist_env()
        self.plan = prepare(data_config_for(cfg, self.adapter), self.env, self.adapter)
        r = self.plan.resolved
        loader = build_loader(self.plan.cfg.data, self.adapter.collate, r.micro_batch_size, self.env.rank,
                              self.env.world_size, split="train")
        it = iter(loader)
        self.batches = [next(it) for _ in range(n_batches)]
        self.accum = r.grad_accum
        self.bf16 = r.precision == "bf16"


class VttSide:
    name = "vtt"

    def __init__(self, s: Setup, device: str):
        from vtt.trainer.run.ds_engine import build_engine, engine_dtype
        self.s, self.device = s, device
        self.engine = build_engine(s.plan, s.adapter)
        self.engine.train()
        self.dtype = engine_dtype(self.engine)
        self.n = 0

    def step(self, batches: list[dict]) -> float:
        from vtt.trainer.run.loop import train_step
        self.n += 1
        self.engine.get_lr()
        stats = train_step(self.engine, iter(batches), self.s.plan, self.device, self.dtype, self.s.adapter,
                           self.s.env, self.n, None)
        return stats.loss


class PlainSide:
    name = "plain"

    def __init__(self, s: Setup, device: str):
        from vtt.trainer.run.ds_engine import param_groups
        self.s, self.device = s, device
        torch.manual_seed(s.plan.cfg.run.seed)  # what build_engine does: same LoRA init
        self.model = s.adapter.load_model().to(device).train()
        if s.bf16:  # fp32 master weights for what trains (bf16 autocast computes); a frozen base stays as loaded
            for p in self.model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        o = s.plan.cfg.optim
        fused = {"fused": True} if device != "cpu" else {"foreach": True}
        self.opt = torch.optim.AdamW(param_groups(self.model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps,
                                     **fused)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.clip = o.grad_clip
        self.world = s.env.world_size
        self.net = self.model
        if self.world > 1:  # the plain multi-device loop: DDP (buckets all-reduced while backward runs)
            ids = [torch.device(device).index] if device != "cpu" else None
            # static_graph: a trainable parameter the forward never uses (LLaVA-NeXT's image_newline on video)
            # is fine without find_unused_parameters' graph walk every step
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids, static_graph=True)

    def global_tokens(self, local: int) -> torch.Tensor | int:
        """The step's label tokens on all ranks (DDP averages gradients over ranks, hence world / tokens)."""
        if self.world == 1:
            return max(local, 1)
        t = torch.tensor(float(local), dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.clamp(min=1).float()

    def step(self, batches: list[dict]) -> torch.Tensor:
        from vtt.trainer.run.ds_engine import to_device
        from vtt.trainer.run.loss import forward_loss, label_count
        tokens = self.global_tokens(sum(label_count(b, self.s.adapter.causal) for b in batches))
        total = torch.zeros((), device=self.device)
        for i, b in enumerate(batches):
            last = i == len(batches) - 1
            with contextlib.nullcontext() if last or self.world == 1 else self.net.no_sync():
                with torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.s.bf16):
                    loss = forward_loss(self.net, to_device(b, self.device, torch.float32), self.s.adapter.causal)
                (loss * (self.world / tokens)).backward()
            total += loss.detach()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return total / tokens  # this rank's share of the mean; stays on the device: no host sync


def sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def timed(side, groups: list[list[dict]], device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    for g in groups:
        side.step(g)
    sync(device)
    return (time.perf_counter() - t0) / len(groups)


def first_step(device: str, make, batches: list[dict]):
    """(side, its first step's loss, GiB it holds on the GPU after that step: weights, optimizer states, kept
    gradient buffers)."""
    before = torch.cuda.memory_allocated() if device != "cpu" else 0
    side = make()
    loss = float(side.step(batches))
    return side, loss, (torch.cuda.memory_allocated() - before) / 2**30 if device != "cpu" else None


def peak_gb(device: str, fn, base: float | None) -> float | None:
    """One side's peak during a step as if it were alone on the GPU: the other side's memory is not counted
    (what it holds after its first step + this step's growth above what was allocated before it)."""
    if device == "cpu":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return base + (torch.cuda.max_memory_allocated() - before) / 2**30


def run_case(name: str, flags: list[str], a) -> dict:
    from vtt.trainer.run.dist import init_distributed
    cfg = config_from_flags(flags)
    s = Setup(cfg, a.steps_per_round * 2)
    device = init_distributed(s.env, 30)
    groups = [s.batches[i:i + s.accum] for i in range(0, len(s.batches) - s.accum + 1, s.accum)]
    vtt, vtt_loss, vtt_gb = first_step(device, lambda: VttSide(s, device), groups[0])  # same weights, batch
    plain, plain_loss, plain_gb = first_step(device, lambda: PlainSide(s, device), groups[0])
    if s.env.world_size > 1:  # the plain side returned this rank's share of the global mean
        t = torch.tensor(plain_loss, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        plain_loss = t.item()
    peaks = {side.name: peak_gb(device, lambda: side.step(groups[1]), base)  # + warm-up
             for side, base in ((vtt, vtt_gb), (plain, plain_gb))}
    if a.profile:
        return profile(vtt if a.profile == "vtt" else plain, groups, device)
    times, ratios = {"vtt": [], "plain": []}, []
    for r in range(a.rounds):
        got = {"vtt": [], "plain": []}
        for k in range(a.steps_per_round):  # single steps alternate: both sides see the same moment's load
            for side in ((vtt, plain) if (r + k) % 2 == 0 else (plain, vtt)):
                got[side.name].append(timed(side, [groups[k % len(groups)]], device))
        ratios.append(statistics.median(got["plain"]) / statistics.median(got["vtt"]))
        for side_name, t in got.items():
            times[side_name] += t
    res = {"case": name, "device": torch.cuda.get_device_name(0) if device != "cpu" else "cpu",
           "world_size": s.env.world_size,
           "zero_stage": s.plan.resolved.zero_stage, "precision": s.plan.resolved.precision,
           "micro_batch": s.plan.resolved.micro_batch_size, "grad_accum": s.accum,
           "vtt_step_s": statistics.median(times["vtt"]), "plain_step_s": statistics.median(times["plain"]),
           "ratio_plain_over_vtt": statistics.median(times["plain"]) / statistics.median(times["vtt"]),
           "ratio_of_fastest": min(times["plain"]) / min(times["vtt"]), "round_ratios": [round(x, 3) for x in ratios],
           "first_loss_vtt": vtt_loss, "first_loss_plain": plain_loss,
           "peak_gb_vtt": peaks["vtt"], "peak_gb_plain": peaks["plain"], "load_1min": os.getloadavg()[0]}
    if s.env.rank == 0:
        print("BENCH_STEP " + json.dumps(res), flush=True)
    return res


def profile(side, groups: list[list[dict]], device: str) -> dict:
    import cProfile
    import pstats
    prof = cProfile.Profile()
    prof.enable()
    t = timed(side, groups, device)
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(45)
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    log(f"{side.name}: {t:.4f} s/step under the profiler")
    return {"profile": side.name, "step_s": t}


def launch(world: int, out: Path, shards: Path | None) -> int:
    """This script again in `world` processes with a launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK);
    returns the first non-zero exit code."""
    from vtt.trainer.run.dist import free_port
    argv = [sys.executable, *sys.argv, "--out", str(out)] + (["--shards", str(shards)] if shards else [])
    if "--" in sys.argv:  # options of this script go before the vtt-train flags
        cut = sys.argv.index("--")
        argv = [sys.executable, *sys.argv[:cut], "--out", str(out), *(["--shards", str(shards)] if shards else []),
                *sys.argv[cut:]]
    port = str(free_port())
    procs = [subprocess.Popen(argv, env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r),
                                         "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                                         "MASTER_PORT": port}) for r in range(world)]
    codes = [p.wait() for p in procs]
    return next((c for c in codes if c), 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="seq2seq,llava_lora", help=f"of {list(CASES)}")
    ap.add_argument("--name", help="with vtt-train flags after --: one custom case of that name")
    ap.add_argument("--out", type=Path, help="work folder (default: a temporary one)")
    ap.add_argument("--shards", type=Path, help="vtt-prep shards (default: made from the sample clips)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps-per-round", type=int, default=8)
    ap.add_argument("--precision", default=None, help="default: fp32 on CPU, bf16 on CUDA (tiny cases only)")
    ap.add_argument("--zero-stage", default=None, help="tiny cases: force a ZeRO stage (default: vtt's choice)")
    ap.add_argument("--profile", choices=("vtt", "plain"), help="cProfile that side's steps instead of timing")
    ap.add_argument("--world", type=int, default=1, help="data-parallel processes on this machine")
    a, rest = ap.parse_known_args()
    rest = [x for x in rest if x != "--"]
    out = a.out or Path(tempfile.mkdtemp(prefix="vtt-bench-step-"))
    out.mkdir(parents=True, exist_ok=True)
    if a.world > 1 and "RANK" not in os.environ:
        shards = a.shards or (None if a.name else make_shards(out))  # once, before the ranks start
        sys.exit(launch(a.world, out, shards))
    cases = {a.name: rest} if a.name else {c: CASES[c] for c in a.cases.split(",")}
    precision = a.precision or ("bf16" if torch.cuda.is_available() else "fp32")
    runs = {}
    for name, flags in cases.items():
        flags = [*flags, "--output-dir", str(out / f"run-{name}"), "--set", "run.progress_bar=false",
                 "--max-steps", "1000"]  # the step count only sets the LR schedule's length here
        if not a.name:
            flags += ["--shards", str(a.shards or make_shards(out)), "--precision", precision]
            flags += ["--zero-stage", a.zero_stage] if a.zero_stage else []
        runs[name] = flags
    from vtt.trainer.run.plan import ensure_preset
    for flags in runs.values():  # as vtt-train: before the process group (save_pretrained saves on rank 0 only)
        ensure_preset(config_from_flags(flags))
    for name, flags in runs.items():
        log(f"{name}: vtt-train {' '.join(flags)}")
        run_case(name, flags, a)

if __name__ == "__main__":
    main()
