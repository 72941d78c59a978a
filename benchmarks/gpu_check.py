"""GPU check for vtt-train: bf16 on real vtt-prep shards with full-size model shapes (random weights), the ZeRO
stage vtt-train picks (bf16 on one GPU: ZeRO-1 with fp32 gradient accumulation; --zero-stage to force one).

Runs (each a `vtt-train` process, a few dozen optimizer steps):
  llava_lora   LLaVA-NeXT-Video with LLaVA-NeXT-Video-7B's shapes (Llama-2-7B text, CLIP ViT-L/14-336 vision,
               2x2 pooling: 144 tokens per frame, 8 frames), LoRA r=16 on the language model + projector,
               frozen vision tower, gradient checkpointing, micro batch 1
  qwen25_lora  Qwen2.5-VL-7B-Instruct's shapes (Qwen2.5-7B text, 32-block ViT with window attention, merger),
               LoRA r=16 on the language model's attention, frozen vision tower, gradient checkpointing, micro
               batch 1, 8 frames of 336x336 (4 temporal patches x 144 = 576 video tokens)
  nllb         NLLB-200-600M's shapes (M2M100, d_model 1024, 12+12 layers, vocab 256206), full fine-tune
  llava_offload (opt-in: --runs ...,llava_offload) the 7B LLaVA, full fine-tune, ZeRO-2 optimizer offload to CPU
  llava_auto, qwen25_auto  the LoRA runs with `--micro-batch auto --set model.gradient_checkpointing=auto`: the
               memory planner picks the fastest setting that fits this card (its choice is logged)
  nllb_auto    the nllb run with the planner's micro batch (the largest token budget that fits: its MFU target)
  <run>_packed (opt-in, llava/qwen runs: e.g. --runs llava_auto_packed) the run with --packing: a micro batch's
               samples in one row, flash-attention varlen where flash-attn is installed, else vtt's sdpa_packed
  <run>_balanced (opt-in, any run: e.g. qwen25_auto_packed_balanced) the run with --balance-tokens
and prints step time, tokens/s, MFU, peak GPU memory and the data-wait fraction per run; then, per run,
benchmarks/bench_step.py with the same flags: vtt-train's step against a plain PyTorch loop on the same batches and
model (the ratio plain / vtt; >= 0.9 is the target), and the peak memory against the memory planner's estimate
(`vtt.trainer.run.memory`, where that module exists). OUT/gpu_check.json keeps them (copy the table into
BENCHMARKS.md with the device name). About 5-8 minutes on one H100 (--no-ratio: 3-5).

How to run, on a CUDA machine without registry access:
  1. beside the repo, a folder of wheels for this project (`pip download -d wheels torch deepspeed transformers
     ... -e .` on a machine with access), then
     python -m venv .venv && .venv/bin/pip install --no-index --find-links wheels -e .
  2. DS_ACCELERATOR=cuda .venv/bin/python benchmarks/gpu_check.py --out /tmp/gpu-check
     Shards: made here with vtt-prep from its built-in sample clips (needs ffmpeg/ffprobe on PATH), or pass
     --shards DIR made elsewhere by `vtt-prep extract` (8 frames, 336x336; `description_fr` for nllb comes
     from `vtt-prep sample-data` sidecars).

MFU = model FLOP/s / peak bf16 FLOP/s (--peak-tflops; default from the device name: H100/H200 989, A100 312),
model FLOPs per optimizer step (matmuls only, no recomputation, no attention scores, embedding lookups excluded):
  decoder-only LM (llava):  T_text * (4 * N_lm + 2 * N_lm_trainable)      [fwd 2N, bwd activations 2N,
                            + T_frames * 2 * N_vision                          weight grads 2N_trainable;
                              (frozen tower: forward only; 577 patches/frame)  T_text includes video tokens]
  qwen25_lora: the same with T_frames * 2 * N_vision replaced by samples/s * patches (8 frames / 2 * 24 * 24)
                            * 2 * N_vision (each 14x14x2 patch is one vision-tower token)
--dry-run (no GPU) writes the model folders' configs, prints each run's vtt-train command and the models'
parameter counts from the meta device.
  seq2seq (nllb):           per sample 6 * (N_enc * T_src + (N_dec + N_lm_head) * T_tgt), with T_src/T_tgt
                            the mean source/target tokens of the shards' samples (count_tokens()) and
                            samples/s from summary.json; the tied LM head counts as a matmul.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}

LLAVA_7B_TEXT = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, head_dim=128, max_position_embeddings=4096, vocab_size=32064)
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768)
NLLB_600M = dict(vocab_size=256206, d_model=1024, encoder_layers=12, decoder_layers=12, encoder_ffn_dim=4096,
                 decoder_ffn_dim=4096, encoder_attention_heads=16, decoder_attention_heads=16,
                 max_position_embeddings=1024)


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------ data

def make_shards(out: Path, n_train: int) -> Path:
    """vtt-prep's own sample clips -> vtt-prep extract (8 frames, 336x336): real shards, no download."""
    from vtt.pipeline.config import PrepConfig
    from vtt.pipeline.run import run_extract
    from vtt.pipeline.sample_data import make_sample_data
    make_sample_data(out / "data", n_train=n_train, n_heldout=0, seed=0)
    report = run_extract(PrepConfig(data_dir=out / "data" / "train", out_dir=out / "shards", num_frames=8,
                                    size=(336, 336), workers=os.cpu_count() or 4, quiet=True))
    log(f"vtt-prep: {report}"[:300])
    return out / "shards"


# ------------------------------------------------------------------ models (random init, real checkpoint layout)

def build_llava_7b(out: Path) -> Path:
    """The tiny preset's tokenizer/processor layout with LLaVA-NeXT-Video-7B's shapes, initialised on the GPU."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vtt.trainer.models.presets import CLIP_MEAN, CLIP_STD, build_tiny, write_vision_processor_files
    if (out / "config.json").is_file() and list(out.glob("*.safetensors")):
        return out
    build_tiny("llava", out)
    cfg = AutoConfig.from_pretrained(out)
    for k, v in LLAVA_7B_TEXT.items():
        setattr(cfg.text_config, k, v)
    for k, v in CLIP_L_336.items():
        setattr(cfg.vision_config, k, v)
    cfg.image_grid_pinpoints = [[336, 336]]
    _save_random(AutoModelForImageTextToText, cfg, out)
    write_vision_processor_files(out, size=336, mean=CLIP_MEAN, std=CLIP_STD, patch_size=14)
    return out


def build_qwen25_7b(out: Path, weights: bool = True) -> Path:
    """presets_qwen.build_shaped_qwen (Qwen2.5-VL-7B's config + processor files) with random GPU-made weights."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vtt.trainer.models.presets_qwen import build_shaped_qwen
    if (out / "config.json").is_file() and (list(out.glob("*.safetensors")) or not weights):
        return out
    build_shaped_qwen(out)
    if weights:
        _save_random(AutoModelForImageTextToText, AutoConfig.from_pretrained(out), out)
    return out


def build_nllb_600m(out: Path) -> Path:
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    from vtt.trainer.models.presets import build_tiny
    if (out / "config.json").is_file() and list(out.glob("*.safetensors")):
        return out
    build_tiny("seq2seq", out)
    cfg = AutoConfig.from_pretrained(out)
    for k, v in NLLB_600M.items():
        setattr(cfg, k, v)
    _save_random(AutoModelForSeq2SeqLM, cfg, out)
    return out


def _save_random(auto_cls, cfg, out: Path) -> None:
    import torch
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):  # random init of 7B params takes minutes on CPU, a second on the GPU
            model = auto_cls.from_config(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    for old in out.glob("*.safetensors"):
        old.unlink()
    model.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    log(f"{out.name}: {n / 1e9:.2f}B random params saved in {time.perf_counter() - t0:.0f}s")


# ------------------------------------------------------------------ runs

def run_args(name: str, models: dict, shards: Path, out: Path, steps: int,
             zero_stage: int | None = None) -> list[str]:
    common = ["--shards", str(shards), "--output-dir", str(out / f"run-{name}"), "--max-steps", str(steps),
              "--log-every", "5", "--save-every", "0", "--set", "run.save_final=false", "--precision", "bf16",
              "--set", "data.num_workers=4", "--set", "model.load_dtype=bfloat16", "--warmup-steps", "2",
              "--set", "run.progress_bar=false"]
    common += ["--zero-stage", str(zero_stage)] if zero_stage is not None else []
    if name.endswith("_balanced"):  # the same run with token-balanced micro batches
        args = run_args(name.removesuffix("_balanced"), models, shards, out, steps, zero_stage)
        return [*args, "--balance-tokens", "--output-dir", str(out / f"run-{name}")]
    if name.endswith("_packed"):  # the same run padding-free (flash-attention varlen where installed)
        args = run_args(name.removesuffix("_packed"), models, shards, out, steps, zero_stage)
        return [*args, "--packing", "--output-dir", str(out / f"run-{name}")]
    if name.endswith("_auto"):  # the LoRA recipe with the planner's micro batch and checkpointing
        base = "nllb" if name.startswith("nllb") else name.replace("_auto", "_lora")
        args = run_args(base, models, shards, out, steps, zero_stage)
        args = [a for a in args if a != "--gradient-checkpointing"]
        args[args.index("--micro-batch") + 1] = "auto"
        return [*args, "--set", "model.gradient_checkpointing=auto", "--output-dir", str(out / f"run-{name}")]
    if name == "llava_lora":
        return ["--model", "llava", "--model-path", str(models["llava"]), "--micro-batch", "1", "--lora",
                "--gradient-checkpointing", "--num-frames", "8", "--set", "model.freeze_vision=true",
                "--lr", "2e-4", "--no-export", *common]
    if name == "qwen25_lora":
        return ["--model", "qwen_vl", "--model-path", str(models["qwen_vl"]), "--micro-batch", "1", "--lora",
                "--gradient-checkpointing", "--num-frames", "8", "--lr", "2e-4", "--no-export", *common]
    if name == "llava_offload":
        return ["--model", "llava", "--model-path", str(models["llava"]), "--micro-batch", "1",
                "--gradient-checkpointing", "--num-frames", "8", "--set", "model.freeze_vision=true",
                "--offload-optimizer", "--lr", "1e-5", "--no-export", *common]
    return ["--model", "seq2seq", "--model-path", str(models["seq2seq"]), "--micro-batch", "16", "--lr", "1e-4",
            "--set", "model.src_lang=eng_Latn", "--set", "model.tgt_lang=fra_Latn",
            "--set", "model.target_template={description_fr}", "--export", *common]


def train(args: list[str], timeout: int) -> float:
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cuda"), WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "vtt.trainer.cli", *args], cwd=REPO, env=env, timeout=timeout,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"vtt-train failed ({p.returncode}):\n{p.stdout[-5000:]}")
    return time.perf_counter() - t0


def step_ratio(name: str, args: list[str], out: Path, timeout: int) -> dict:
    """benchmarks/bench_step.py on the same flags: vtt's step vs the plain loop, interleaved, in one process."""
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cuda"), WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_step.py"), "--name", name, "--out", str(out / "bench"),
           "--rounds", "4", "--steps-per-round", "5", "--", *args]
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    except subprocess.TimeoutExpired:
        return {"error": f"bench_step timed out after {timeout}s"}
    lines = [x for x in p.stdout.splitlines() if x.startswith("BENCH_STEP ")]
    if p.returncode != 0 or not lines:
        return {"error": f"bench_step failed ({p.returncode}): {p.stdout[-2000:]}"}
    return json.loads(lines[-1][len("BENCH_STEP "):])


def resolved(args: list[str]) -> tuple[list[str], float | None, str]:
    """The planner on these vtt-train flags, as vtt-train itself resolves them (same device): the flags with any
    `auto` made concrete (bench_step runs those), the estimated peak per device in GiB (as peak mem), and what it chose.
    A planner failure is reported, not raised: the measured run still counts."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_step import config_from_flags
    from vtt.trainer.run.memory import resolve_auto
    try:
        res = resolve_auto(config_from_flags(args))
    except Exception as e:  # noqa: BLE001 - recorded in the results
        return args, None, f"planner failed: {type(e).__name__}: {e}"
    e = res.estimate
    concrete = [*args, "--micro-batch", str(e.micro_batch),
                "--set", f"model.gradient_checkpointing={str(e.gradient_checkpointing).lower()}"]
    return concrete, e.total / 2**30, f"micro {e.micro_batch}, ckpt {e.gradient_checkpointing}"


def count_tokens(model_path: Path, shards: Path, n: int = 64) -> tuple[float, float]:
    """Mean source and target tokens per sample of the seq2seq run (for the encoder/decoder FLOP split)."""
    from vtt.trainer.models.registry import get_adapter
    from vtt.trainer.models.model_config import ModelConfig
    from vtt.trainer.data.loader import DataConfig, build_loader
    ad = get_adapter(ModelConfig(kind="seq2seq", model_path=str(model_path), src_lang="eng_Latn",
                                 tgt_lang="fra_Latn", target_template="{description_fr}"))
    loader = build_loader(DataConfig(str(shards), eval_shards=str(shards), decode_frames=False), list, 1,
                          split="eval")
    src = tgt = k = 0
    for (s,) in loader:
        b = ad.collate([s])
        src, tgt, k = src + int(b["attention_mask"].sum()), tgt + int((b["labels"] != -100).sum()), k + 1
        if k >= n:
            break
    return src / k, tgt / k


def module_params(model_path: Path, kind: str) -> dict:
    """Parameter counts per part, from the config on the meta device (no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoModelForSeq2SeqLM
    cfg = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        m = (AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForImageTextToText).from_config(cfg)
    count = {}
    for name, p in m.named_parameters():
        vision = "vision_tower" in name or ".visual." in name or name.startswith("visual.")
        part = ("vision" if vision else "embed" if "embed_tokens" in name or name.endswith("shared.weight")
                else "lm_head" if "lm_head" in name else "encoder" if ".encoder." in name
                else "decoder" if ".decoder." in name else "lm")
        count[part] = count.get(part, 0) + p.numel()
    if kind == "seq2seq" and "lm_head" not in count:  # tied: the head's matmul still runs
        count["lm_head"] = cfg.vocab_size * cfg.d_model
    if kind == "llava":
        count["frame_patches"] = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 + 1
    if kind == "qwen_vl":  # per frame of 336x336: (336/14)^2 patches, each spanning 2 frames
        count["frame_patches"] = (336 // cfg.vision_config.patch_size) ** 2 / cfg.vision_config.temporal_patch_size
    return count


def flops_llava(s: dict, parts: dict, frames_per_sample: int) -> float:
    """Model FLOPs per second from summary.json (formula in the module docstring)."""
    n_lm = parts.get("lm", 0) + parts.get("decoder", 0) + parts.get("lm_head", 0)
    trainable = s["trainable_params"]  # LoRA + projector: ~all of it sits in the language model
    text = s["tokens_per_s"] * (4 * n_lm + 2 * min(trainable, n_lm))
    vision = s["samples_per_s"] * frames_per_sample * parts["frame_patches"] * 2 * parts.get("vision", 0)
    return text + vision


def flops_seq2seq(s: dict, parts: dict, src: float, tgt: float) -> float:
    per_sample = 6 * (parts.get("encoder", 0) * src + (parts.get("decoder", 0) + parts["lm_head"]) * tgt)
    return s["samples_per_s"] * per_sample


def peak_tflops(arg: float | None) -> tuple[str, float]:
    import torch
    name = torch.cuda.get_device_name(0)
    if arg:
        return name, arg
    for key, v in PEAK_TFLOPS.items():
        if key in name:
            return name, v
    raise SystemExit(f"unknown peak bf16 TFLOP/s for {name!r}: pass --peak-tflops")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/vtt-gpu-check"))
    ap.add_argument("--shards", type=Path, help="vtt-prep shards (default: made here from sample clips)")
    ap.add_argument("--runs", default="llava_lora,qwen25_lora,nllb")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--samples", type=int, default=96, help="sample clips to make when --shards is not given")
    ap.add_argument("--peak-tflops", type=float)
    ap.add_argument("--timeout", type=int, default=420, help="per vtt-train run, seconds")
    ap.add_argument("--zero-stage", type=int, help="force this ZeRO stage (default: vtt-train's choice)")
    ap.add_argument("--no-ratio", action="store_true", help="skip the step benchmark against the plain loop")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: configs, commands, parameter counts only")
    a = ap.parse_args()
    if a.dry_run:
        return dry_run(a)
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA GPU (torch.cuda.is_available() is False)")
    device, peak = peak_tflops(a.peak_tflops)
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    shards = a.shards or make_shards(a.out, a.samples)
    runs = a.runs.split(",")
    models = {}
    if any(r.startswith("llava") for r in runs):
        models["llava"] = build_llava_7b(a.out / "llava-next-video-7b-random")
    if any(r.startswith("qwen25") for r in runs):
        models["qwen_vl"] = build_qwen25_7b(a.out / "qwen2.5-vl-7b-random")
    if any(r.startswith("nllb") for r in runs):
        models["seq2seq"] = build_nllb_600m(a.out / "nllb-600m-random")
    results = {"device": device, "peak_tflops": peak, "torch": torch.__version__, "runs": {}}
    for name in runs:
        shutil.rmtree(a.out / f"run-{name}", ignore_errors=True)
        log(f"training {name} for {a.steps} steps ...")
        args = run_args(name, models, shards, a.out, a.steps, a.zero_stage)
        concrete, planned_gb, choice = resolved(args)
        log(f"{name}: planner: {choice}, estimated peak {planned_gb} GB")
        wall = train(args, a.timeout)
        s = json.loads((a.out / f"run-{name}" / "summary.json").read_text())
        kind = "seq2seq" if name.startswith("nllb") else "qwen_vl" if name.startswith("qwen") else "llava"
        parts = module_params(models[kind], kind)
        flops = (flops_seq2seq(s, parts, *count_tokens(models[kind], shards)) if kind == "seq2seq"
                 else flops_llava(s, parts, 8))
        results["runs"][name] = {**s, "wall_s": wall, "model_tflops": flops / 1e12, "mfu": flops / (peak * 1e12),
                                 "planned_peak_gb": planned_gb, "planner": choice}
        log(f"{name}: done in {wall:.0f}s")
        if not a.no_ratio and name != "llava_offload":
            results["runs"][name]["bench_step"] = b = step_ratio(name, concrete, a.out, a.timeout)
            log(f"{name}: step ratio plain/vtt {b.get('ratio_plain_over_vtt')} {b.get('error', '')[:300]}")
    results["total_s"] = time.perf_counter() - t0
    (a.out / "gpu_check.json").write_text(json.dumps(results, indent=1) + "\n")
    print_table(results)


def dry_run(a) -> None:
    """The CPU path: the Qwen run's model folder (config, no weights), its command and parameter counts."""
    a.out.mkdir(parents=True, exist_ok=True)
    models = {"qwen_vl": build_qwen25_7b(a.out / "qwen2.5-vl-7b-config", weights=False)}
    parts = module_params(models["qwen_vl"], "qwen_vl")
    print("qwen25_lora:", " ".join(["vtt-train", *run_args("qwen25_lora", models, a.shards or a.out / "shards",
                                                           a.out, a.steps)]))
    print("parameters:", {k: (f"{v / 1e9:.3f}B" if v > 1e6 else v) for k, v in parts.items()})


def print_table(r: dict) -> None:
    print(f"\nvtt-train GPU check on {r['device']} (peak {r['peak_tflops']:.0f} bf16 TFLOP/s), "
          f"total {r['total_s']:.0f}s")
    print("| run | params (trainable) | ZeRO | step s | samples/s | tokens/s | MFU | peak mem GB | planned GB | "
          "data wait | final loss | bench vtt s | bench plain s | ratio plain/vtt |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, s in r["runs"].items():
        b = s.get("bench_step") or {}
        print(f"| {name} | {s['params'] / 1e9:.2f}B ({s['trainable_params'] / 1e6:.1f}M) | {s['zero_stage']} | "
              f"{s['step_s']:.3f} | {s['samples_per_s']:.1f} | {s['tokens_per_s']:.0f} | {100 * s['mfu']:.1f}% | "
              f"{s['peak_memory_gb'] or 0:.1f} | {_num(s.get('planned_peak_gb'), '.1f')} | "
              f"{100 * s['data_wait_frac']:.1f}% | {s['final_loss']:.3f} | {_num(b.get('vtt_step_s'), '.3f')} | "
              f"{_num(b.get('plain_step_s'), '.3f')} | {_num(b.get('ratio_plain_over_vtt'), '.2f')} |")


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


if __name__ == "__main__":
    main()
