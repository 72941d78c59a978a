"""Memory planner: the peak GPU memory per device of a vtt-train run, estimated from the model's config.json alone.

`estimate(...)` builds the model on the meta device (no weights, any size: the real 7B shapes cost milliseconds),
applies the adapter's own LoRA/freezing rules to count trainable parameters exactly, and adds up documented
formulas. `vtt-train ... --plan` prints it; `resolve_auto` turns `--micro-batch auto` / gradient checkpointing
`auto` into the fastest setting that fits the device; benchmarks/gpu_check.py compares it with measured peaks.

The accounting (bytes per device; P = all parameters, T = trainable ones, N = world size, e = bytes per
activation element: 2 for bf16, 4 for fp32):

  weights      bf16: 2P (DeepSpeed casts the module to bf16), fp32: 4P; ZeRO-3 partitions them: / N.
  gradients    bf16: 2T, fp32: 4T; ZeRO-2/3 keep only the rank's partition: / N (+ the reduce bucket below).
  optimizer    Adam in mixed precision keeps K = 12 bytes per trainable parameter (fp32 master copy, momentum,
               variance); pure fp32 K = 8 (the weights are the master copy). ZeRO-1/2/3 partition them: / N;
               optimizer offload moves them to the host (0 here). (Rajbhandari et al., "ZeRO: Memory
               Optimizations Toward Training Trillion Parameter Models", SC'20, section 3.1: 2P + 2P + KP.)
  autocast     bf16 by torch.autocast (deepspeed.autocast, the one-process full fine-tune default): 4T fp32
               weights + the frozen rest as loaded, 4T gradients, K = 8, ZeRO-0; plus the bf16 copies of the
               trainable weights kept for the backward pass (2T), and activations counted at 4 bytes (the fp32
               residual stream and norms beside bf16 matmul outputs: a bound, not yet measured on a GPU).
  step         DeepSpeed's ZeRO-1/2 step casts the gradient partition to fp32 (4T/N) beside the states; it lives
               only during optimizer.step(), after the activations are freed, so the peak takes the larger of
               the two.
  buffers      ZeRO-1/2/3 reduce (and ZeRO-3 prefetch) buckets of bf16/fp32 elements, as run/ds_config.py sets them
               (reduce_bucket_size = hidden^2).
  activations  what autograd saves for the backward pass, per token per layer, from the tensors each op saves
               (the method of Korthikanti et al., "Reducing Activation Recomputation in Large Transformer
               Models", MLSys'23, section 4.1: 34sbh + 5as^2b per GPT layer), redone for the layers vtt trains:
               SDPA/flash attention keeps q, k, v, its output and a logsumexp instead of the a*s^2 score
               matrices; Llama/Qwen RMSNorm keeps an fp32 copy of its input; SwiGLU keeps gate, up and
               silu(gate); a frozen linear keeps no input (only its weight, for the input gradient); LoRA keeps
               its dropout mask and dropped input; a frozen tower that nothing upstream trains keeps nothing.
               See `layer_bytes`. With gradient checkpointing (one checkpoint per layer, as transformers does)
               each layer keeps only its input (e*h per token), plus one layer's full activations while it is
               recomputed (Korthikanti section 5: 2sbhL + one layer).
  logits       the LM head's output for every position (e*V each) and, for the label positions, the fp32
               log-softmax of the loss (4V, run/loss.py upcasts only those) plus its fp32 input copy (4V).

The estimate is the allocator's peak (torch.cuda.max_memory_allocated); the CUDA context (~0.5-1 GiB) and
fragmentation are what `headroom` is for when fitting. What it leaves out: the vision tower's transient
forward memory when frozen, attention implementations that materialise scores (eager), cuDNN workspaces.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field

import torch
import transformers
from transformers import AutoConfig
from vtt.shards.index import read_index
from vtt.trainer.config import DEFAULT_MICRO_BATCH, ConfigError
from vtt.trainer.data.loader import resolve_source
from vtt.trainer.inputs.qwen_video import VideoSpec
from vtt.trainer.models.llava import video_layout
from vtt.trainer.models.model_io import checkpoint_file
from vtt.trainer.models.registry import adapter_class
from vtt.trainer.run import ds_config as dsc

GIB = 1024 ** 3
DEFAULT_HEADROOM = 0.10  # fraction of device memory left free when fitting (context, fragmentation)
DEFAULT_TEXT_TOKENS = 128  # prompt + answer tokens per sample when nothing better is known
MAX_AUTO_MICRO = 256
# Step time model for picking the fastest fitting setting: a micro batch of n tokens costs (n + SATURATION)
# token-times (a GPU is under-used below a few thousand tokens per matmul), x 4/3 with checkpointing (one
# more forward in fwd + 2 x fwd backward). A heuristic; gpu_check measures the real ratio.
SATURATION_TOKENS = 4096
RECOMPUTE_COST = 4 / 3
# Step time of ZeRO-2 shards over whole replicas at the same micro batch (several processes): partitioned
# gradient reductions + the all-gather of updated weights vs one all-reduce (two CPU ranks, bench_step --world 2:
# 1.1-1.3x). resolve_auto takes shards only where they fit a micro batch faster by more than that.
SHARDING_COST = 1.15


class PlanError(ValueError):
    """The model's config cannot be planned for (unknown architecture, missing dimensions)."""


@dataclass(frozen=True)
class Stack:
    """One stack of identical transformer layers, and how it trains."""
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    act: str            # silu_gated (SwiGLU: gate, up, down) | relu | gelu | quick_gelu (fc1, fc2)
    rms_fp32: bool      # Llama/Qwen RMSNorm: an fp32 copy of its input is saved
    mode: str           # full | lora | frozen (gradient passes through) | none (no backward at all)
    cross: bool = False  # decoder layer with cross-attention over the encoder output
    dropout: bool = False  # hidden dropout after attention and MLP (a 1-byte mask each)


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a model: exact parameter counts (meta device) and its layer stacks."""
    kind: str
    model_type: str
    params: int
    trainable: int
    hidden: int       # the language model's (bucket sizes)
    vocab: int
    stacks: tuple[Stack, ...]
    lora_r: int = 0
    lora_dropout: bool = False
    lora_targets: int = 0  # attention projections per layer carrying LoRA (q, k, v, o = 4)
    head_trains: bool = False  # the LM head's weight trains (keeps its input)
    projector: tuple[int, int] | None = None  # trained projector/merger: (vision hidden, text hidden)


@dataclass(frozen=True)
class Estimate:
    """Peak memory per device in bytes, by component; `total` = the peak with the chosen checkpointing."""
    weights: int
    gradients: int
    optimizer: int
    step: int
    buffers: int
    activations: int          # without gradient checkpointing
    activations_ckpt: int     # with it
    logits: int
    gradient_checkpointing: bool
    micro_batch: int
    frames: int
    video_tokens: int         # per sample
    tokens: int               # per sample (video + text)
    params: int
    trainable: int
    notes: tuple[str, ...] = ()

    @property
    def static(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.buffers

    @property
    def total(self) -> int:
        act = self.activations_ckpt if self.gradient_checkpointing else self.activations
        return self.static + max(act + self.logits, self.step)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["total"] = self.total
        return d


# ------------------------------------------------------------------ the model on the meta device

def meta_model(model_cfg) -> torch.nn.Module:
    """The model of model_cfg built from its config.json on the meta device, with the adapter's own LoRA and
    freezing applied (requires_grad as in training). No weights, no tokenizer needed."""
    if checkpoint_file(model_cfg.model_path, "config.json") is None:
        raise PlanError(f"{model_cfg.model_path}: no config.json to plan from")
    config = AutoConfig.from_pretrained(model_cfg.model_path)
    auto = "AutoModelForSeq2SeqLM" if model_cfg.kind == "seq2seq" else "AutoModelForImageTextToText"
    cfg = dataclasses.replace(model_cfg, gradient_checkpointing=False)
    with torch.device("meta"):
        try:
            model = getattr(transformers, auto).from_config(config)
        except ValueError as e:
            raise PlanError(f"{model_cfg.model_path}: {e}") from None
        return adapter_class(model_cfg.kind).setup_model(model, cfg)


def _trains(model, part: str) -> str:
    """full | lora | none for the parameters whose names contain `part`."""
    ps = [(n, p) for n, p in model.named_parameters() if part in n]
    if any(p.requires_grad and "lora_" not in n for n, p in ps if n.endswith("proj.weight") or "fc" in n):
        return "full"
    if any(p.requires_grad for n, p in ps if "lora_" in n):
        return "lora"
    return "none"


def _dims(c, layers_key="num_hidden_layers") -> dict:
    def get(*names, default=None):
        for n in names:
            if getattr(c, n, None) is not None:
                return getattr(c, n)
        if default is None:
            raise PlanError(f"config {type(c).__name__} lacks {names[0]}")
        return default
    heads = get("num_attention_heads", "num_heads", "encoder_attention_heads")
    return {"layers": get(layers_key, "depth"), "hidden": get("hidden_size", "embed_dim", "d_model"),
            "intermediate": get("intermediate_size", "encoder_ffn_dim"), "heads": heads,
            "kv_heads": get("num_key_value_heads", default=heads)}


def model_shape(model_cfg, model: torch.nn.Module | None = None) -> ModelShape:
    """Parameter counts and layer stacks of model_cfg's model (built on the meta device when not given)."""
    model = model if model is not None else meta_model(model_cfg)
    config = getattr(model, "config", None) or model.get_base_model().config
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = dict(lora_r=model_cfg.lora_r if model_cfg.lora else 0,
                lora_dropout=model_cfg.lora and model_cfg.lora_dropout > 0,
                lora_targets=_lora_targets_per_layer(model))
    if model_cfg.kind == "seq2seq":
        return _seq2seq_shape(model_cfg, model, config, params, trainable, lora)
    text, vision = config.text_config, config.vision_config
    lm_mode = _trains(model, "language_model")
    tower = "visual" if model_cfg.kind == "qwen_vl" else "vision_tower"
    vmode = _trains(model, tower)
    if lm_mode == "none" and any(p.requires_grad for n, p in model.named_parameters() if tower not in n):
        lm_mode = "frozen"  # a trainable projector/merger below: the gradient passes through the LM
    stacks = [Stack("language model", **_dims(text), act="silu_gated", rms_fp32=True, mode=lm_mode)]
    vd = _dims(vision)
    gated = model_cfg.kind == "qwen_vl" and getattr(vision, "hidden_act", "") == "silu"  # Qwen2.5-VL's blocks
    act = "silu_gated" if gated else _act(getattr(vision, "hidden_act", "gelu"))
    stacks.append(Stack("vision tower", **vd, act=act, rms_fp32=gated, mode=vmode))
    part = "visual.merger" if model_cfg.kind == "qwen_vl" else "multi_modal_projector"
    proj = (vd["hidden"], text.hidden_size) if _any_trains(model, part) else None
    return ModelShape(model_cfg.kind, config.model_type, params, trainable, text.hidden_size, text.vocab_size,
                      tuple(stacks), **lora, head_trains=_any_trains(model, "lm_head"), projector=proj)


def _seq2seq_shape(model_cfg, model, c, params, trainable, lora) -> ModelShape:
    mode = _trains(model, "layers")
    drop = (getattr(c, "dropout", 0) or 0) > 0
    common = dict(hidden=c.d_model, act=_act(c.activation_function), rms_fp32=False, mode=mode, dropout=drop)
    enc = Stack("encoder", c.encoder_layers, intermediate=c.encoder_ffn_dim, heads=c.encoder_attention_heads,
                kv_heads=c.encoder_attention_heads, **common)
    dec = Stack("decoder", c.decoder_layers, intermediate=c.decoder_ffn_dim, heads=c.decoder_attention_heads,
                kv_heads=c.decoder_attention_heads, cross=True, **common)
    return ModelShape("seq2seq", c.model_type, params, trainable, c.d_model, c.vocab_size, (enc, dec), **lora,
                      head_trains=_any_trains(model, "lm_head"))


def _any_trains(model, part: str) -> bool:
    return any(p.requires_grad for n, p in model.named_parameters() if part in n)


def _act(name: str) -> str:
    return "relu" if name == "relu" else "quick_gelu" if name == "quick_gelu" else "gelu"


# e*I tensors a non-gated MLP keeps (trained fc2 / frozen fc2): relu its output, which is fc2's input too;
# gelu its input + fc2's input; quick_gelu x, sigmoid(1.702x) and fc2's input
ACT_SAVES = {"relu": (1, 1), "gelu": (2, 1), "quick_gelu": (3, 2)}


def _lora_targets_per_layer(model) -> int:
    names = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_A" in n}
    return len(names & {"q_proj", "k_proj", "v_proj", "o_proj", "out_proj"})


# ------------------------------------------------------------------ activation formulas

def layer_bytes(s: Stack, e: int, lora_r: int = 0, lora_dropout: bool = False, lora_targets: int = 4,
                enc_tokens_ratio: float = 1.0, mask: int = 1) -> float:
    """Bytes autograd keeps per token for one layer of stack s (e = bytes per activation element).

    Per op, what its backward needs (h hidden, k = kv heads x head dim, I intermediate, a heads):
      norm (x2)      Llama/Qwen RMSNorm: an fp32 copy of its input 4h (+ the normalised e*h for a trained
                     weight); LayerNorm: its input e*h (+ per-token stats)
      attention in   the norm output as input of q/k/v (saved once, they share it): e*h if trained
      SDPA           q e*h, k and v e*k each, output e*h, logsumexp 4a (no a*s^2 scores: flash/efficient)
      o_proj in      the attention output, the same storage as SDPA's (transposed back as a view)
      MLP            SwiGLU: gate, up, silu(gate) 3*e*I (+ down's input e*I and the norm output e*h if trained);
                     fc1-act-fc2: ACT_SAVES x e*I (relu 1, gelu 2, quick_gelu 3) + fc1's input e*h if trained
      dropout        a mask per hidden dropout (2 per layer, 3 with cross-attention): `mask` bytes per element,
                     1 on CUDA (fused dropout keeps a bool mask), e on CPU (input * mask keeps the mask in the
                     input's dtype)
      LoRA (q,k,v,o) per target: the dropped input e*h, its mask and the rank-r output e*r (without dropout:
                     the shared q/k/v input and o's input, 2*e*h per layer)
      cross-attn     decoder: q from the norm as above, k/v over the encoder tokens (ratio = encoder/decoder)
    """
    if s.mode == "none":
        return 0.0
    h, I, a = s.hidden, s.intermediate, s.heads
    k = s.kv_heads * (h // s.heads)
    train = s.mode == "full"
    norm = 4 * h + (e * h if train else 0) if s.rms_fp32 else e * h  # LayerNorm: input (+ fp32 stats)
    attn = (e * h if train else 0) + e * (2 * h + 2 * k) + 4 * a
    if s.act == "silu_gated":
        mlp = e * (3 * I + (I + h if train else 0))
    else:
        mlp = e * (ACT_SAVES[s.act][0 if train else 1] * I + (h if train else 0))
    total = 2 * norm + attn + mlp
    if s.cross:
        total += norm + (e * h if train else 0) + e * (2 * h) + 4 * a  # q's input, q, output, logsumexp
        total += e * 2 * h * enc_tokens_ratio  # k and v over the encoder positions
    if s.dropout:
        total += mask * h * (3 if s.cross else 2)
    if s.mode == "lora" and lora_r:
        total += lora_targets * (e * h + mask * h + e * lora_r) if lora_dropout else 2 * e * h
    return float(total)


def checkpointed_bytes(s: Stack, e: int) -> float:
    """Per token per layer under activation checkpointing: the layer's input only (e*h)."""
    return 0.0 if s.mode == "none" else float(e * s.hidden)


# ------------------------------------------------------------------ video tokens

@functools.lru_cache(maxsize=256)
def video_tokens(model_cfg, frames: int, frame_size: tuple[int, int]) -> tuple[int, int]:
    """(LM video tokens, vision-tower tokens) of one sample of `frames` frames of frame_size (h, w)."""
    if model_cfg.kind == "seq2seq" or frames == 0:
        return 0, 0
    config = AutoConfig.from_pretrained(model_cfg.model_path)
    if model_cfg.kind == "llava":
        layout = video_layout(config)
        grid = layout.image_size // config.vision_config.patch_size
        return layout.num_tokens(frames), frames * (grid * grid + 1)
    spec = VideoSpec.from_checkpoint(model_cfg.model_path, config.model_type)
    n = spec.num_tokens(frames, *frame_size)
    return n, n * spec.merge_size ** 2  # the tower sees every patch before the 2x2 merge


def frames_for_budget(model_cfg, budget: int, stored: int, frame_size: tuple[int, int]) -> int:
    """The most frames (<= stored) whose video tokens fit `budget`; at least 1 (2 for Qwen's temporal pairs)."""
    lo = 2 if model_cfg.kind == "qwen_vl" else 1
    best = lo
    for f in range(lo, stored + 1):
        if video_tokens(model_cfg, f, frame_size)[0] <= budget:
            best = f
    return min(best, stored)


# ------------------------------------------------------------------ the estimate

@dataclass(frozen=True)
class PlanInputs:
    """Everything besides the model that the estimate depends on."""
    micro_batch: int = 1
    frames: int = 8
    frame_size: tuple[int, int] = (336, 336)
    text_tokens: int = DEFAULT_TEXT_TOKENS  # prompt + answer per sample (seq2seq: source; target = label_tokens)
    label_tokens: int = 32                  # tokens that carry a loss per sample
    zero_stage: int = 2
    precision: str = "bf16"
    autocast: bool = False  # bf16 by torch.autocast over fp32 trainable weights (run/ds_config.use_autocast)
    world_size: int = 1
    gradient_checkpointing: bool = False
    offload_optimizer: bool = False
    mask_bytes: int = 1  # per dropout-mask element: 1 on CUDA; tests on CPU pass e (layer_bytes)
    notes: tuple[str, ...] = field(default=())


def estimate(model_cfg, inputs: PlanInputs, shape: ModelShape | None = None) -> Estimate:
    """Peak bytes per device for training model_cfg's model under `inputs` (see the module docstring)."""
    shape = shape or model_shape(model_cfg)
    i = inputs
    e = 2 if i.precision == "bf16" else 4
    n = i.world_size
    P, T = shape.params, shape.trainable
    weights = e * P // (n if i.zero_stage == 3 else 1)
    grads = e * T // (n if i.zero_stage >= 2 else 1)
    K = 12 if i.precision == "bf16" else 8
    if i.autocast:  # fp32 trainable weights (the master copy: K = 8) and gradients, the frozen rest as loaded
        weights, grads, K = 4 * T + e * (P - T), 4 * T, 8
    optim = 0 if i.offload_optimizer else K * T // (n if i.zero_stage >= 1 else 1)
    step = 0 if i.offload_optimizer or i.zero_stage == 0 else 4 * T // n
    buckets = {0: 0, 1: 1, 2: 2, 3: 2}[i.zero_stage]  # reduce bucket (+ its copy for overlap / prefetch)
    buffers = buckets * e * shape.hidden ** 2
    if i.autocast:  # the bf16 copies autocast makes of the trainable weights are kept for the backward pass,
        buffers += 2 * T  # and its fp32 residual stream and norms widen activations: counted at 4 bytes (bound)
        e = 4
    vid, tower = video_tokens(model_cfg, i.frames, i.frame_size)
    tokens = vid + i.text_tokens
    act, ckpt = _activations(shape, i, e, tokens, tower)
    lm_tokens = i.label_tokens if shape.kind == "seq2seq" else tokens
    logits = i.micro_batch * shape.vocab * (e * lm_tokens + 8 * i.label_tokens)
    return Estimate(weights, grads, optim, step, buffers, act, ckpt, logits, i.gradient_checkpointing,
                    i.micro_batch, i.frames if vid else 0, vid, tokens, P, T, i.notes)


def _activations(shape: ModelShape, i: PlanInputs, e: int, tokens: int, tower_tokens: int) -> tuple[int, int]:
    """(without, with checkpointing) for one micro batch: sum over stacks of layers x tokens x bytes."""
    plain = ckpt = 0.0
    for s in shape.stacks:
        if s.name == "vision tower":
            toks = tower_tokens
        elif s.name == "decoder":
            toks = i.label_tokens
        else:
            toks = tokens if shape.kind != "seq2seq" else i.text_tokens
        ratio = i.text_tokens / max(i.label_tokens, 1)
        per = layer_bytes(s, e, shape.lora_r, shape.lora_dropout, shape.lora_targets or 4, ratio, i.mask_bytes)
        plain += s.layers * toks * per
        ckpt += s.layers * toks * checkpointed_bytes(s, e) + toks * per  # + one layer being recomputed
    rest = _outside_layers(shape, i, e, tokens, tower_tokens)
    return int(i.micro_batch * (plain + rest)), int(i.micro_batch * (ckpt + rest))


def _outside_layers(shape: ModelShape, i: PlanInputs, e: int, tokens: int, tower_tokens: int) -> float:
    """Per sample, outside the checkpointed layers: the final norm(s) and the LM head's input if it trains;
    a VLM's bool mask where video features are scattered into the embeddings (h per token); a trained
    projector/merger: its input e*vision_h and GELU in/out 2*e*h per tower token."""
    h = shape.hidden
    if shape.kind == "seq2seq":
        return i.text_tokens * e * h + i.label_tokens * (e * h + (e * h if shape.head_trains else 0))
    out = tokens * (4 * h + (e * h if shape.head_trains else 0) + h)
    if shape.projector and tower_tokens:
        out += tower_tokens * e * (shape.projector[0] + 2 * shape.projector[1])
    return float(out)


# ------------------------------------------------------------------ fitting

def device_memory(configured_gb: float | None) -> tuple[int | None, str]:
    """(bytes, where from): torch.cuda's device 0 where present, else the configured value, else None."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return int(props.total_memory), f"{props.name} (torch.cuda)"
    if configured_gb:
        return int(configured_gb * GIB), "deepspeed.device_memory_gb"
    return None, "no CUDA device (CPU run): give --device-memory GB to plan for a GPU"


def step_cost(micro: int, tokens: int, ckpt: bool) -> float:
    """Relative time per sample of a micro batch (the heuristic above); lower is faster."""
    return (micro * tokens + SATURATION_TOKENS) * (RECOMPUTE_COST if ckpt else 1.0) / micro


def fit(model_cfg, inputs: PlanInputs, memory: int, headroom: float, micro: int | None,
        ckpt: bool | None, shape: ModelShape | None = None, max_micro: int = MAX_AUTO_MICRO) -> Estimate | None:
    """The fastest (micro batch, checkpointing) with micro / ckpt fixed where given (not None) whose estimate
    fits memory x (1 - headroom), an auto micro batch at most max_micro; None when none does. Costs
    O(log max_micro) estimates per choice."""
    shape = shape or model_shape(model_cfg)
    limit = memory * (1 - headroom)
    best = None
    for c in ([ckpt] if ckpt is not None else [False, True]):
        m = micro if micro is not None else _largest_micro(model_cfg, inputs, shape, c, limit, max_micro)
        if not m:
            continue
        est = estimate(model_cfg, dataclasses.replace(inputs, micro_batch=m, gradient_checkpointing=c), shape)
        if est.total > limit:
            continue
        if best is None or step_cost(m, est.tokens, c) < step_cost(best.micro_batch, best.tokens,
                                                                     best.gradient_checkpointing):
            best = est
    return best


def _largest_micro(model_cfg, inputs, shape, ckpt: bool, limit: float, max_micro: int = MAX_AUTO_MICRO) -> int:
    def fits(m):
        i = dataclasses.replace(inputs, micro_batch=m, gradient_checkpointing=ckpt)
        return estimate(model_cfg, i, shape).total <= limit
    if not fits(1):
        return 0
    lo, hi = 1, max(1, min(MAX_AUTO_MICRO, max_micro))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


# ------------------------------------------------------------------ a TrainConfig's plan

def shard_frames(data_cfg) -> tuple[int | None, tuple[int, int] | None]:
    """(frames per sample, (h, w)) as the shards' index records vtt-prep's settings; None where unknown."""
    try:
        settings = read_index(data_cfg.shards, data_cfg.storage_options).settings or {}
    except Exception:  # no readable index: the plan says so, training reports it properly
        return None, None
    frames = settings.get("num_frames") or settings.get("max_frames")
    size = settings.get("size")
    hw = (int(size[1]), int(size[0])) if isinstance(size, (list, tuple)) and len(size) == 2 else None
    return (int(frames) if frames else None), hw


def samples_per_rank(data_cfg) -> int | None:
    """Training samples each device sees per epoch (index counts less the eval split): a bigger auto micro batch
    than that could not make one step. None where the index cannot be read (training reports that)."""
    try:
        return resolve_source(data_cfg, "train").total // _world_size()
    except Exception:  # as shard_frames: the plan goes on without it
        return None


def inputs_for(cfg, frames: int, frame_size: tuple[int, int], micro: int, ckpt: bool,
               replica: bool = False) -> PlanInputs:
    ds = cfg.deepspeed
    text = DEFAULT_TEXT_TOKENS if cfg.model.kind != "seq2seq" else min(cfg.model.max_source_len, DEFAULT_TEXT_TOKENS)
    return PlanInputs(micro_batch=micro, frames=frames, frame_size=frame_size, text_tokens=text,
                      label_tokens=min(32, cfg.model.max_target_len),
                      zero_stage=zero_stage(cfg, replica), autocast=autocast(cfg, replica),
                      precision=ds.precision or "bf16", world_size=_world_size(),
                      gradient_checkpointing=ckpt, offload_optimizer=ds.offload_optimizer)


def autocast(cfg, replica: bool = False) -> bool:
    """Whether the run computes bf16 by torch.autocast (as run/ds_config.resolve decides, without reading an
    external JSON: one makes it False unless it says otherwise)."""
    ds = cfg.deepspeed
    return dsc.use_autocast(ds, _world_size(), ds.precision or "bf16", not cfg.model.lora, bool(ds.config_file),
                            replica)


def zero_stage(cfg, replica: bool = False) -> int:
    """The ZeRO stage the run will take (run/ds_config.resolve's default where the settings name none)."""
    ds = cfg.deepspeed
    if ds.zero_stage is not None:
        return ds.zero_stage
    return 0 if autocast(cfg, replica) else dsc.default_stage(ds, _world_size(), ds.precision or "bf16", replica)


def replica_choices(cfg) -> tuple[bool, ...]:
    """(True, False) where the run may hold a whole replica per device or shard it (several processes, no ZeRO
    stage named, no external JSON, no offload); else (False,): nothing to choose."""
    ds = cfg.deepspeed
    free = _world_size() > 1 and ds.zero_stage is None and not ds.config_file and not ds.offload_optimizer
    return (True, False) if free else (False,)


def planned_frames(cfg) -> tuple[int, tuple[int, int], int | None]:
    """(frames per sample, (h, w), frames the shards hold) the estimate uses: data.num_frames of what the shards
    hold (8 where neither says), at their size (336x336 where unknown). Reads the shards' index once."""
    stored, size = shard_frames(cfg.data)
    frames = min(x for x in (cfg.data.num_frames, stored, 10**6) if x)
    return (frames if frames < 10**6 else 8), size or (336, 336), stored


def chooses_replica(cfg) -> bool:
    """Several processes free to choose (replica_choices): whether each device holds a whole replica - the
    one-process settings, ZeRO-0 (fp32, bf16 by autocast) or ZeRO-1 (bf16 LoRA) - rather than ZeRO-2 shards:
    yes where the estimate at the run's micro batch, frames and checkpointing fits device memory less headroom,
    and where device memory is unknown (a CPU run without --device-memory). Costs one meta-device model build
    and the shards' index read."""
    if replica_choices(cfg) == (False,):
        return False
    ds = cfg.deepspeed
    memory, _ = device_memory(ds.device_memory_gb)
    if memory is None:
        return True
    frames, size, _ = planned_frames(cfg)
    micro = ds.micro_batch_size if isinstance(ds.micro_batch_size, int) else DEFAULT_MICRO_BATCH
    ckpt = cfg.model.gradient_checkpointing is True
    est = estimate(cfg.model, inputs_for(cfg, frames, size, micro, ckpt, replica=True))
    return est.total <= memory * (1 - ds.memory_headroom)


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class Resolution:
    """What resolve_auto decided and why, for --plan and the run log."""
    cfg: object
    estimate: Estimate | None
    memory: int | None
    memory_source: str
    stored_frames: int | None
    frame_size: tuple[int, int]
    lines: tuple[str, ...]
    replica: bool = False  # several processes, each device holding a whole replica (chooses_replica)

    def summary(self) -> str:
        """One line for the run log: what `auto` became and the estimated peak."""
        e = self.estimate
        head = "no estimate" if e is None else (
            f"micro batch {e.micro_batch}, gradient checkpointing {'on' if e.gradient_checkpointing else 'off'}, "
            f"{e.frames} frames: estimated peak {e.total / 2**30:.1f} GiB per device")
        return head + "".join(f"; {x}" for x in self.lines)


def resolve_auto(cfg) -> Resolution:
    """cfg with `auto` micro batch / gradient checkpointing and the video-token budget made concrete.

    Frames: data.num_frames, capped by data.video_tokens (the most frames whose video tokens fit), of what the
    shards hold. Micro batch and checkpointing: the fastest pair that fits the device memory less headroom
    (fit); with several processes free to choose, whole replicas per device or ZeRO-2 shards, whichever gives
    the faster fit, sharding's own cost counted (SHARDING_COST; chooses_replica then agrees). On a CPU run
    without --device-memory there is nothing to fill: 4 and off."""
    frames, size, stored = planned_frames(cfg)
    lines = []
    data = cfg.data
    if cfg.data.video_tokens and cfg.model.kind != "seq2seq":
        most = frames if cfg.data.num_frames or stored else 64  # unknown: the budget alone decides
        frames = frames_for_budget(cfg.model, cfg.data.video_tokens, most, size)
        data = dataclasses.replace(data, num_frames=frames)
        lines.append(f"video-token budget {cfg.data.video_tokens}: {frames} frames per sample")
    memory, source = device_memory(cfg.deepspeed.device_memory_gb)
    micro, ckpt = cfg.deepspeed.micro_batch_size, cfg.model.gradient_checkpointing
    shape = model_shape(cfg.model)
    est, replica = None, replica_choices(cfg)[0]
    if memory is None:
        micro = DEFAULT_MICRO_BATCH if micro == "auto" else micro or DEFAULT_MICRO_BATCH
        ckpt = False if ckpt == "auto" else ckpt
        lines.append(f"device memory unknown ({source})")
    else:
        fixed_m = None if micro == "auto" else (micro or DEFAULT_MICRO_BATCH)
        most = samples_per_rank(cfg.data) if fixed_m is None else None
        if most is not None and most < MAX_AUTO_MICRO:
            lines.append(f"micro batch at most {most}: the training samples per device")
        fits = [(fit(cfg.model, inputs_for(cfg, frames, size, fixed_m or 1, False, r), memory,
                     cfg.deepspeed.memory_headroom, fixed_m, None if ckpt == "auto" else bool(ckpt), shape,
                     most or MAX_AUTO_MICRO), r) for r in replica_choices(cfg)]
        fits = [(e, r) for e, r in fits if e is not None]
        if not fits and (micro == "auto" or ckpt == "auto"):
            raise ConfigError(f"{cfg.model.model_path}: no micro batch fits {memory / GIB:.1f} GiB ({source}) "
                              "even with gradient checkpointing: use ZeRO-3, more devices, optimizer offload, "
                              "fewer frames (--num-frames / --video-tokens) or LoRA")
        if fits:  # a replica unless shards allow a step_cost faster by more than what sharding costs
            est, replica = min(fits, key=lambda f: _layout_cost(*f))
            micro, ckpt = est.micro_batch, est.gradient_checkpointing
        else:
            micro, ckpt, replica = fixed_m, bool(ckpt), False
    est = est or estimate(cfg.model, inputs_for(cfg, frames, size, micro, bool(ckpt), replica), shape)
    cfg = dataclasses.replace(cfg, data=data, model=dataclasses.replace(cfg.model, gradient_checkpointing=bool(ckpt)),
                              deepspeed=dataclasses.replace(cfg.deepspeed, micro_batch_size=micro))
    return Resolution(cfg, est, memory, source, stored, size, tuple(lines), replica)


def _layout_cost(e: Estimate, replica: bool) -> float:
    """step_cost of a fit, ZeRO-2 shards' own communication counted (SHARDING_COST)."""
    return step_cost(e.micro_batch, e.tokens, e.gradient_checkpointing) * (1 if replica else SHARDING_COST)


def needs_resolution(cfg) -> bool:
    return "auto" in (cfg.deepspeed.micro_batch_size, cfg.model.gradient_checkpointing) or \
        bool(cfg.data.video_tokens)


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def plan_text(res: Resolution) -> str:
    """The --plan report: components of the peak per device, the fit, and frames traded for micro batch."""
    cfg, e = res.cfg, res.estimate
    ds = cfg.deepspeed
    out = [f"vtt-train plan: {cfg.model.model_path} ({cfg.model.kind}), {e.params / 1e9:.3f}B parameters, "
           f"{e.trainable / 1e6:.1f}M trainable ({'LoRA r' + str(cfg.model.lora_r) if cfg.model.lora else 'full'})",
           f"  per device: world size {_world_size()}, ZeRO-{zero_stage(cfg, res.replica)}, "
           f"{ds.precision or 'bf16'}{' (autocast)' if autocast(cfg, res.replica) else ''}, micro batch "
           f"{e.micro_batch}, gradient checkpointing {'on' if e.gradient_checkpointing else 'off'}"]
    if e.video_tokens:
        out.append(f"  video: {e.frames} frames of {res.frame_size[1]}x{res.frame_size[0]} (shards hold "
                   f"{res.stored_frames or '?'}) -> {e.video_tokens} video tokens, {e.tokens} tokens per sample")
    else:
        out.append(f"  tokens per sample: {e.tokens}")
    if cfg.data.packing:
        out.append(_packing_line(cfg, e))
    rows = [("weights", e.weights), ("gradients", e.gradients), ("optimizer states", e.optimizer),
            ("optimizer step (fp32 grads)", e.step), ("comm buffers", e.buffers),
            ("activations, no checkpointing", e.activations), ("activations, checkpointing", e.activations_ckpt),
            ("logits + loss", e.logits)]
    out += [f"  {name:<32}{gib(v):>12}" for name, v in rows]
    out.append(f"  {'estimated peak':<32}{gib(e.total):>12}")
    out += [f"  {line}" for line in res.lines]
    if res.memory:
        limit = res.memory * (1 - ds.memory_headroom)
        verdict = "fits" if e.total <= limit else "DOES NOT FIT"
        out.append(f"  device: {gib(res.memory)} ({res.memory_source}); {verdict} with "
                   f"{ds.memory_headroom:.0%} headroom ({gib(limit)} usable)")
        out += _trade_table(res, limit)
    return "\n".join(out)


def _packing_line(cfg, e: Estimate) -> str:
    """data.packing: a micro batch is one row of its samples' tokens; the estimate is its longest case (every
    sample at the planned frames). Not in the estimate: plain sdpa/eager build a (row x row) bool block-diagonal
    mask from the restarting positions (transformers' masking_utils); vtt's per-sample sdpa and flash-attention's
    varlen path build none (vtt.trainer.inputs.packing)."""
    row = e.micro_batch * e.tokens
    attn = cfg.model.attn_implementation or "sdpa"
    mask = f"a {gib(row * row)} attention mask ({attn})" if attn in ("sdpa", "eager") else f"no mask ({attn})"
    return f"  packing: one row of up to {row} tokens per micro batch (no padding), {mask}"


def _trade_table(res: Resolution, limit: float) -> list[str]:
    """Frames vs the largest micro batch that fits, without and with checkpointing (--num-frames /
    --video-tokens trade one for the other)."""
    cfg, e = res.cfg, res.estimate
    if not e.video_tokens:
        return []
    shape = model_shape(cfg.model)
    top = res.stored_frames or e.frames
    options = sorted({f for f in (top, top // 2, top // 4, e.frames) if f >= 2}, reverse=True)
    out = ["  frames  video tokens  largest micro batch (no ckpt / ckpt)"]
    for f in options:
        i = inputs_for(cfg, f, res.frame_size, 1, False, res.replica)
        m0 = _largest_micro(cfg.model, i, shape, False, limit)
        m1 = _largest_micro(cfg.model, i, shape, True, limit)
        out.append(f"  {f:>6}  {video_tokens(cfg.model, f, res.frame_size)[0]:>12}  {m0:>6} / {m1}")
    return out
