"""trainer/models/presets.py: tiny checkpoints are saved like real ones and load back through from_pretrained."""
import json

import pytest
import torch
from safetensors.torch import load_file

from vtt.trainer.models.presets import LANG_CODES, build_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("presets")
    return {k: build_tiny(k, root / k) for k in ("llava", "seq2seq")}


def test_llava_preset_is_a_real_checkpoint(tiny):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer
    path = tiny["llava"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
                 "preprocessor_config.json", "video_preprocessor_config.json"):
        assert (path / name).is_file(), name
    cfg = AutoConfig.from_pretrained(path)
    assert cfg.model_type == "llava_next_video" and cfg.vision_config.model_type == "clip_vision_model"
    assert cfg.text_config.model_type == "llama" and cfg.text_config.hidden_size <= 64
    model = AutoModelForImageTextToText.from_pretrained(path)
    assert type(model).__name__ == "LlavaNextVideoForConditionalGeneration"
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.convert_tokens_to_ids("<video>") == cfg.video_token_id
    assert tok("x <video> y", add_special_tokens=False).input_ids.count(cfg.video_token_id) == 1
    assert tok("hi").input_ids[0] == tok.bos_token_id == cfg.text_config.bos_token_id
    proc = json.loads((path / "video_preprocessor_config.json").read_text())
    assert proc["crop_size"] == {"height": cfg.vision_config.image_size, "width": cfg.vision_config.image_size}
    assert len(proc["image_mean"]) == len(proc["image_std"]) == 3


def test_tiny_tokenizers_are_lossless_on_unseen_text(tiny):
    from transformers import AutoTokenizer
    text = "A zebra (42) crosses the road — déjà vu, 東京!"
    for path in tiny.values():
        tok = AutoTokenizer.from_pretrained(path)
        assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
        assert tok.unk_token_id not in tok(text).input_ids


def test_seq2seq_preset_is_nllb_shaped(tiny):
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer, GenerationConfig
    path = tiny["seq2seq"]
    cfg = AutoConfig.from_pretrained(path)
    assert cfg.model_type == "m2m_100" and cfg.scale_embedding and cfg.decoder_start_token_id == cfg.eos_token_id
    tok = AutoTokenizer.from_pretrained(path)
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)  # as NLLB
    codes = [tok.convert_tokens_to_ids(c) for c in LANG_CODES]
    assert len(set(codes)) == len(codes) and tok.unk_token_id not in codes
    gen = GenerationConfig.from_pretrained(path)
    assert gen.forced_bos_token_id == tok.convert_tokens_to_ids("eng_Latn")
    assert gen.decoder_start_token_id == tok.eos_token_id
    model = AutoModelForSeq2SeqLM.from_pretrained(path)
    assert type(model).__name__ == "M2M100ForConditionalGeneration"


def test_build_is_deterministic_per_seed(tmp_path):
    a = load_file(build_tiny("seq2seq", tmp_path / "a", seed=3) / "model.safetensors")
    b = load_file(build_tiny("seq2seq", tmp_path / "b", seed=3) / "model.safetensors")
    c = load_file(build_tiny("seq2seq", tmp_path / "c", seed=4) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_unknown_kind_and_family(tmp_path):
    with pytest.raises(ValueError, match="unknown model kind 'gpt'"):
        build_tiny("gpt", tmp_path)
    with pytest.raises(ValueError, match="unknown llava family 'llava_next'"):
        build_tiny("llava", tmp_path, family="llava_next")


@pytest.mark.parametrize("shape,billions", [("llava-next-video-7b", 7.06), ("nllb-600m", 0.615)])
def test_full_size_shapes_match_the_real_models(shape, billions, tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoModelForSeq2SeqLM

    from vtt.trainer.models.registry import get_adapter
    from vtt.trainer.models.model_config import ModelConfig
    from vtt.trainer.models.presets import SHAPE_KINDS, build_shaped
    path = build_shaped(shape, tmp_path)
    assert not list(path.glob("*.safetensors"))  # config only: weights are made where they are used
    auto = AutoModelForImageTextToText if SHAPE_KINDS[shape] == "llava" else AutoModelForSeq2SeqLM
    with torch.device("meta"):  # counts parameters without allocating them
        model = auto.from_config(AutoConfig.from_pretrained(path))
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.01)
    adapter = get_adapter(ModelConfig(kind=SHAPE_KINDS[shape], model_path=str(path), random_init=True))
    assert adapter.hidden_size in (4096, 1024)
    if shape.startswith("llava"):
        assert adapter.layout.num_tokens(8) == 8 * 144  # 336/14 = 24 patches a side, 2x2 pooled, as in the real one


def test_random_init_ignores_the_saved_weights(tiny):
    from vtt.trainer.models.registry import get_adapter
    from vtt.trainer.models.model_config import ModelConfig
    saved = get_adapter(ModelConfig(kind="seq2seq", model_path=str(tiny["seq2seq"]))).load_model()
    torch.manual_seed(1)
    fresh = get_adapter(ModelConfig(kind="seq2seq", model_path=str(tiny["seq2seq"]), random_init=True)).load_model()
    assert type(fresh) is type(saved)
    assert not torch.equal(fresh.model.shared.weight, saved.model.shared.weight)
