"""Qwen-VL (issue 12): video inputs as the families' processors make them, on real vtt-prep shards; training,
resume, export and generation with the tiny presets; Qwen2.5-VL-7B's real shapes on the meta device."""
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import make_prep_shards, metrics, vtt_train  # noqa: E402

from vtt.shards.conversation import SampleError  # noqa: E402
from vtt.trainer.models.registry import get_adapter  # noqa: E402
from vtt.trainer.models.model_config import ModelConfig  # noqa: E402
from vtt.trainer.inputs.chat import Turn  # noqa: E402
from vtt.trainer.data.loader import DataConfig, build_loader  # noqa: E402
from vtt.trainer.models.presets import build_tiny  # noqa: E402
from vtt.trainer.models.presets_qwen import QWEN_FAMILIES, build_shaped_qwen  # noqa: E402
from vtt.trainer.inputs.qwen_video import VideoSpec, load_video_processor, port_video  # noqa: E402

COMMON = ["--model", "qwen_vl", "--preset", "tiny", "--micro-batch", "2", "--log-every", "1", "--lr", "3e-3",
          "--warmup-steps", "1"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_prep_shards(tmp_path_factory.mktemp("prep"), n_train=16, n_heldout=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    return {f: build_tiny("qwen_vl", root / f, family=f) for f in QWEN_FAMILIES}


@pytest.fixture(scope="module")
def samples(shards):
    return next(iter(build_loader(DataConfig(str(shards[0])), list, micro_batch=4, split="train")))


def adapter(path, **kw):
    return get_adapter(ModelConfig(kind="qwen_vl", model_path=str(path), **kw))


@pytest.mark.skipif(load_video_processor(None, probe=True) is None,
                    reason="the families' video processors need torchvision (not importable with the CPU torch wheel)")
@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_port_equals_the_checkpoints_video_processor(tiny, samples, family):
    """Where torchvision runs: vtt's torch port gives the processor's pixel_values_videos and video_grid_thw."""
    proc = load_video_processor(str(tiny[family]))
    spec = VideoSpec.from_checkpoint(str(tiny[family]), family)
    for s in samples:
        frames = np.stack(s["frames"])
        ref = proc(videos=[torch.from_numpy(frames).permute(0, 3, 1, 2)], do_sample_frames=False, return_tensors="pt")
        pix, grid = port_video(frames, spec)
        assert grid == ref["video_grid_thw"][0].tolist()
        torch.testing.assert_close(pix, ref["pixel_values_videos"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_port_layout_equals_the_image_processor_on_still_pairs(tiny, samples, family):
    """Without torchvision: a clip whose frame pairs are equal is what the family's PIL image processor makes of
    each frame (the processor broadcasts an image over the temporal patch): same patch layout, normalisation and
    resize target, computed by transformers' own code."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    spec = VideoSpec.from_checkpoint(str(tiny[family]), family)
    frames = np.stack(samples[0]["frames"])[[0, 0, 2, 2]]
    pix, grid = port_video(frames, spec)
    image = Qwen2VLImageProcessorPil(patch_size=spec.patch_size, merge_size=spec.merge_size, temporal_patch_size=2,
                                     image_mean=list(spec.mean), image_std=list(spec.std), do_resize=False)
    ref = image(images=[frames[0], frames[2]], return_tensors="pt")
    assert grid == [2, *ref["image_grid_thw"][0, 1:].tolist()]
    torch.testing.assert_close(pix, ref["pixel_values"], atol=1e-5, rtol=0)
    # the resize target (image smart_resize for Qwen2/2.5; Qwen3-VL's video one counts the frames)
    big = np.repeat(np.repeat(frames, 3, axis=1), 5, axis=2)  # 96 x 160
    _, grid = port_video(big, spec)
    if family != "qwen3_vl":
        ref = Qwen2VLImageProcessorPil(patch_size=spec.patch_size, merge_size=spec.merge_size,
                                       size={"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels})
        assert grid[1:] == ref(images=[big[0]], return_tensors="pt")["image_grid_thw"][0, 1:].tolist()
    assert grid[1] * grid[2] * spec.patch_size ** 2 <= (spec.max_pixels if family != "qwen3_vl"
                                                         else spec.max_pixels // 4)


def processor_prompt_ids(family, adapter_, video, times):
    """The prompt ids the family's transformers processor makes: the chat template over a video part and text,
    then its own replace_video_token + get_text_with_replacements (ProcessorMixin), then the tokenizer. The
    processors' constructors want their (torchvision) video processor, so the instance carries what these two
    methods read: the token strings and the video processor's merge and temporal sizes."""
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    cls = {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor, "qwen3_vl": Qwen3VLProcessor}[family]
    proc = object.__new__(cls)
    proc.video_token, proc.image_token = "<|video_pad|>", "<|image_pad|>"
    proc.vision_start_token, proc.vision_end_token = "<|vision_start|>", "<|vision_end|>"
    proc.video_processor = SimpleNamespace(merge_size=2, temporal_patch_size=2)
    # frames_indices / fps = the real pts (fps 1): what the processor computes from sampled-frame metadata
    inputs = {"video_grid_thw": [video["video_grid_thw"]],
              "video_metadata": [SimpleNamespace(fps=1.0, frames_indices=list(times))]}
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "\nDescribe this video."}]}]
    text = adapter_.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = proc.get_text_with_replacements([text], [], [proc.replace_video_token(inputs, 0)])[0][0]
    return adapter_.tokenizer(full, add_special_tokens=False).input_ids


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_video_tokens_match_the_processor_and_the_model(tiny, samples, family):
    """On real vtt-prep samples: the text carries the processor's video tokens (Qwen3-VL: its time stamps from the
    frames' real pts), the model's vision tower yields one feature per video token, M-RoPE inputs are there."""
    a = adapter(tiny[family])
    batch = a.collate(samples)
    model = a.load_model().eval()
    n_pad = int((batch["input_ids"] == a.video_id).sum())
    with torch.no_grad():
        feats = model.model.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"])
    out = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    n_feat = sum(x.shape[0] for x in (out if isinstance(out, (list, tuple)) else [out]))
    assert n_pad == n_feat == sum(int(g.prod()) // 4 for g in batch["video_grid_thw"])
    assert (batch["mm_token_type_ids"] == 2).sum() == n_pad
    times = samples[0]["meta"]["vtt"]["timestamps"]
    if family == "qwen2_5_vl":  # the processor's 2 / fps with the clip's real frame interval
        fps = (len(times) - 1) / (times[-1] - times[0])
        assert batch["second_per_grid_ts"][0].item() == pytest.approx(2 / fps)
    else:
        assert "second_per_grid_ts" not in batch
    video = a._video(samples[0])
    item = {"ids": a._text_ids("k", [Turn("user", a.prompt)], generation=True)}
    prompt = item["ids"][0][:item["ids"][2]] + a._video_ids(video) + item["ids"][0][item["ids"][2] + 1:]
    assert prompt == processor_prompt_ids(family, a, video, times)
    if family == "qwen3_vl":
        assert f"<{(times[0] + times[1]) / 2:.1f} seconds>" in a.tokenizer.decode(batch["input_ids"][0])
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_answer_only_labels_and_caption_samples(tiny, samples):
    a = adapter(tiny["qwen2_5_vl"], conversations=False)
    batch = a.collate(samples[:1])
    learned = [i for i in batch["labels"][0].tolist() if i != -100]
    assert a.tokenizer.decode(learned) == samples[0]["meta"]["description"] + "<|im_end|>"
    a = adapter(tiny["qwen2_5_vl"])
    batch = a.collate(samples[:1])
    learned = a.tokenizer.decode([i for i in batch["labels"][0].tolist() if i != -100])
    turns = samples[0]["meta"]["conversations"]
    assert learned == "".join(t["value"] + "<|im_end|>" for t in turns if t["from"] == "gpt")


def test_bad_inputs_name_the_checkpoint_or_sample(tiny, samples, shards, tmp_path):
    llava = build_tiny("llava", tmp_path / "llava")
    with pytest.raises(ValueError, match=r"llava.*'llava_next_video' is not a Qwen-VL family"):
        adapter(llava)
    p = vtt_train("--model", "qwen_vl", "--model-path", llava, "--shards", shards[0], "--output-dir",
                  tmp_path / "run", "--max-steps", 1, check=False)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 1 and "vtt-train: error:" in last and "is not a Qwen-VL family" in last, p.stderr[-2000:]
    a = adapter(tiny["qwen2_vl"])
    one = dict(samples[0], frames=samples[0]["frames"][:1])
    with pytest.raises(SampleError, match=r"1 frame\(s\), fewer than one temporal patch of 2"):
        a.collate([one])
    cfg = json.loads((tiny["qwen2_vl"] / "video_preprocessor_config.json").read_text())
    fixed = tmp_path / "fixed"
    shutil.copytree(tiny["qwen2_vl"], fixed)
    (fixed / "video_preprocessor_config.json").write_text(json.dumps(dict(cfg, do_resize=False)))
    odd = dict(samples[0], frames=[f[:30, :30] for f in samples[0]["frames"]])
    with pytest.raises(SampleError, match=r"30x30 are not a multiple of patch x merge = 16.*do_resize=false"):
        adapter(fixed).collate([odd])
    three = dict(samples[0], frames=samples[0]["frames"][:3])  # odd: the last frame repeats, as the processor does
    assert a.collate([three])["video_grid_thw"][0, 0] == 2


def test_qwen25_7b_shapes_on_the_meta_device(tmp_path):
    """Qwen2.5-VL-7B-Instruct's config on the meta device: LoRA on the language model's attention only, vision
    tower frozen, the merger trainable on request; video tokens at 336x336 and at the default max pixels."""
    from transformers import AutoConfig
    path = build_shaped_qwen(tmp_path / "7b")
    cfg = AutoConfig.from_pretrained(path)
    assert (cfg.text_config.hidden_size, cfg.text_config.num_hidden_layers, cfg.vision_config.depth) == (3584, 28, 32)
    a = adapter(path, lora=True, lora_r=16)
    model = _meta(cfg)
    assert 8.2e9 < sum(p.numel() for p in model.parameters()) < 8.4e9  # 8.29B with the untied lm_head
    model = a.setup(model)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert all("language_model" in n and "lora_" in n for n in trainable)
    per_layer = 16 * ((3584 + 3584) * 2 + (3584 + 512) * 2)  # q, o: 3584 -> 3584; k, v: 3584 -> 512
    assert sum(trainable.values()) == 28 * per_layer == 10_092_544
    merged = adapter(path, lora=True, train_merger=True).setup(_meta(cfg))
    merger = sum(p.numel() for n, p in merged.named_parameters() if p.requires_grad and "merger" in n)
    assert merger == 1280 + 5120 * 5120 + 5120 + 5120 * 3584 + 3584
    spec = a.spec
    assert spec.num_tokens(8, 336, 336) == 4 * 12 * 12 == 576
    assert spec.num_tokens(8, 3584, 3584) == 4 * 128 * 128 == 65536  # 12,845,056 px a frame: the max
    assert spec.num_tokens(8, 4000, 4000) == 65536  # larger frames are scaled down to it


def _meta(cfg):
    from transformers import AutoModelForImageTextToText
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(cfg)


@pytest.fixture(scope="module")
def qwen_run(shards, tmp_path_factory):
    """Tiny Qwen2.5-VL, LoRA + merger, ZeRO-2 bf16: 6 steps, checkpoints at 3 and 6, export."""
    train, evals, _ = shards
    run = tmp_path_factory.mktemp("qwen25") / "run"
    args = [*COMMON, "--shards", train, "--output-dir", run, "--max-steps", 6, "--save-every", 3, "--lora",
            "--set", "model.train_merger=true", "--set", "model.lora_r=8"]
    vtt_train(*args)
    return run, args


def test_qwen25_trains_resumes_and_exports(qwen_run, shards, tmp_path):
    from transformers import AutoModelForImageTextToText
    run, args = qwen_run
    train, _ = metrics(run)
    assert [x["step"] for x in train] == list(range(1, 7))
    assert train[-1]["loss"] < train[0]["loss"]
    assert "kind: qwen_vl" in (run / "config.yaml").read_text()
    crashed = tmp_path / "run"
    shutil.copytree(run, crashed, ignore=shutil.ignore_patterns("final", "step_00000006"))
    (crashed / "checkpoints" / "latest").write_text("step_00000003")
    vtt_train(*[str(crashed) if a == run else a for a in args], "--resume")
    for a, b in zip(train[3:], metrics(crashed)[0][3:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), (a, b)
    final = run / "final"
    model = AutoModelForImageTextToText.from_pretrained(final)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert not any("lora" in n for n, _ in model.named_parameters())
    for name in ("video_preprocessor_config.json", "preprocessor_config.json", "chat_template.jinja"):
        assert (final / name).is_file(), name
    a = adapter(final)
    got = a.generate(model, next(iter(build_loader(DataConfig(str(shards[1])), list, micro_batch=2,
                                                   split="train"))), max_new_tokens=4)
    assert len(got) == 2 and all(isinstance(x, str) for x in got)
    from vtt.trainer.tools.caption import caption, frame_spec, load_info, video_sample
    video = sorted(shards[2].glob("*.mp4"))[0]
    sample = video_sample(video, frame_spec(load_info(final, None)["frames"], None))
    assert len(sample["meta"]["vtt"]["timestamps"]) == len(sample["frames"]) == 4  # real pts reach the model
    out = caption(str(run), [str(shards[1]), str(video)], limit=1, max_new_tokens=4, device="cpu")  # vtt-caption
    assert [k for k, _ in out][-1] == video.stem and all(isinstance(t, str) for _, t in out)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_other_families_train_resume_and_export(shards, tmp_path, family):
    from transformers import AutoModelForImageTextToText

    from vtt.trainer.tools.gen_eval import EvalConfig, run_eval
    train, evals, _ = shards
    run = tmp_path / "run"
    args = [*COMMON, "--shards", train, "--output-dir", run, "--max-steps", 4, "--save-every", 2, "--lora",
            "--set", f"run.preset_family={family}", "--gradient-checkpointing"]
    vtt_train(*args)
    assert json.loads((run / "preset-qwen_vl" / "config.json").read_text())["model_type"] == family
    crashed = tmp_path / "crashed"
    shutil.copytree(run, crashed, ignore=shutil.ignore_patterns("final", "step_00000004"))
    (crashed / "checkpoints" / "latest").write_text("step_00000002")
    vtt_train(*[str(crashed) if a == run else a for a in args], "--resume")
    for a, b in zip(metrics(run)[0][2:], metrics(crashed)[0][2:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), (a, b)
    model = AutoModelForImageTextToText.from_pretrained(run / "final")
    assert model.config.model_type == family
    out = run_eval(EvalConfig(model=str(run), shards=str(evals), out=str(tmp_path / "eval"), limit=2,
                              max_new_tokens=4, device="cpu"))  # vtt-eval
    assert out["n"] > 0 and (tmp_path / "eval" / "predictions.jsonl").is_file()


def test_qwen_config_yaml_loads():
    from vtt.trainer.config import load_config
    cfg = load_config(Path(__file__).parents[1] / "configs" / "qwen_vl.yaml",
                      {"data": {"shards": "S"}, "run": {"output_dir": "R"}})
    assert cfg.model.kind == "qwen_vl" and cfg.model.lora and cfg.model.num_frames % 2 == 0


@pytest.mark.slow
def test_two_ranks_zero3_qwen3(shards, tmp_path):
    """ZeRO-3 over two CPU processes (the deepspeed launcher): every rank runs the vision tower every step, the
    export gathers the partitioned weights."""
    from transformers import AutoModelForImageTextToText
    run = tmp_path / "run"
    vtt_train(*COMMON, "--shards", shards[0], "--output-dir", run, "--max-steps", 3, "--zero-stage", 3, "--lora",
              "--num-gpus", 2, "--save-every", 0, "--set", "run.preset_family=qwen3_vl", "--micro-batch", 1)
    assert [x["step"] for x in metrics(run)[0]] == [1, 2, 3]
    model = AutoModelForImageTextToText.from_pretrained(run / "final")
    assert model.config.model_type == "qwen3_vl" and all(p.numel() > 0 for p in model.parameters())


@pytest.mark.slow
def test_demo_trains_the_tiny_qwen_preset(tmp_path):
    """scripts/demo.py --model qwen: sample clips -> vtt-prep -> tiny Qwen2.5-VL -> held-out captions, colour and
    shape far above chance (25%, 33%; measured with the demo's 384 clips: 100%, 98%; direction stays at chance)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("vtt_demo_qwen", Path(__file__).parents[1] / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = demo
    spec.loader.exec_module(demo)
    report = demo.run_demo(demo.DemoConfig(out=tmp_path / "demo", n_train=256, n_heldout=32, seed=0,
                                           kinds=("qwen",), qwen_steps=600))
    acc = report["results"]["qwen"]["accuracy"]["all"]
    assert acc["colour"] > 0.6 and acc["shape"] > 0.6, acc


def test_gpu_check_qwen_run_dry(tmp_path):
    """benchmarks/gpu_check.py's Qwen2.5-VL-7B run without a GPU: its model folder, command and parameter split."""
    import subprocess
    from train_helpers import PY, REPO, train_env
    p = subprocess.run([PY, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
                       cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "--model qwen_vl" in p.stdout and "--lora" in p.stdout and "'lm': '6.526B'" in p.stdout
    assert json.loads((tmp_path / "qwen2.5-vl-7b-config" / "config.json").read_text())["model_type"] == "qwen2_5_vl"
