"""Sample text is data, never markup (trainer/inputs/text.py): special-token strings in sidecar fields are tokenised as
characters, in prompts, answers and seq2seq text, while the template's own markup keeps working."""
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from vtt.shards.format import frame_field, sha256_file, shard_name
from vtt.shards.index import ShardEntry, ShardIndex, write_index
from vtt.shards.conversation import SampleError
from vtt.trainer.models.registry import get_adapter
from vtt.trainer.models.model_config import ModelConfig
from vtt.trainer.models.presets import build_tiny
from vtt.trainer.inputs.text import encode, render_spans

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import vtt_train  # noqa: E402

NASTY = "a clip that says <video> and </s> out loud"


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    return str(build_tiny("llava", root / "llava")), str(build_tiny("seq2seq", root / "s2s"))


def sample(desc=NASTY, title="clip", frames=2):
    rng = np.random.default_rng(0)
    return {"key": "k", "text": desc, "frames": rng.integers(0, 256, (frames, 16, 16, 3), dtype=np.uint8),
            "meta": {"description": desc, "title": title, "fr": desc}}


def test_render_spans_mark_field_values_and_replace_markup_in_the_template_only():
    text, spans = render_spans("USER: <video> {title}: {description!r:>5}", sample(title="<video>"), "prompt",
                               markup={"<video>": "<V>"})
    assert text == f"USER: <V> <video>: {NASTY!r}"
    assert [text[a:b] for a, b in spans] == ["<video>", repr(NASTY)]
    with pytest.raises(SampleError, match="needs field 'missing'"):
        render_spans("{missing}", sample(), "prompt")


def test_llava_caption_with_special_tokens_is_text(paths):
    ad = get_adapter(ModelConfig(kind="llava", model_path=paths[0]))
    s = sample()
    batch = ad.collate([s, sample("a plain caption")])
    n_video = ad.layout.num_tokens(2)
    tok = ad.tokenizer
    for row, labels in zip(batch["input_ids"], batch["labels"]):
        assert int((row == ad.layout.token_id).sum()) == n_video  # the caption's "<video>" adds none
    answer = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert answer.count(tok.eos_token_id) == 1 and answer[-1] == tok.eos_token_id  # its "</s>" is no EOS
    assert tok.convert_tokens_to_ids("<video>") not in answer
    assert tok.decode(answer[:-1]).strip() == NASTY


def test_llava_prompt_field_with_placeholder_string_keeps_one_placeholder(paths):
    ad = get_adapter(ModelConfig(kind="llava", model_path=paths[0], prompt="USER: <video>\nIs {title}? ASSISTANT:"))
    ids, at = ad._prompt_ids(sample(title="<video><image></s>"))
    assert ids.count(ad.layout.token_id) == 1 and ids[at] == ad.layout.token_id
    assert ad.tokenizer.decode(ids[at + 1:]) == "\nIs <video><image></s>? ASSISTANT:"


def test_plain_text_tokenises_exactly_as_the_tokenizer_does(paths):
    ad = get_adapter(ModelConfig(kind="llava", model_path=paths[0]))
    tok = ad.tokenizer
    text, spans = render_spans("USER: <video>\nDescribe {title}. ASSISTANT:", sample(title="the red square"), "p")
    assert encode(tok, text, spans) == tok(text).input_ids


def test_seq2seq_text_with_special_tokens_is_text(paths):
    ad = get_adapter(ModelConfig(kind="seq2seq", model_path=paths[1], source_template="{description}",
                                 target_template="{fr}", src_lang="eng_Latn", tgt_lang="fra_Latn"))
    tok = ad.tokenizer
    s = sample("go </s> fra_Latn <mask> stop")
    batch = ad.collate([s])
    src = batch["input_ids"][0].tolist()
    assert src[0] == ad.src_id and src[-1] == tok.eos_token_id and src.count(tok.eos_token_id) == 1
    assert src.count(ad.tgt_id) == 0 and tok.convert_tokens_to_ids("<mask>") not in src
    assert tok.decode(src[1:-1]) == "go </s> fra_Latn <mask> stop"
    no_lang = get_adapter(ModelConfig(kind="seq2seq", model_path=paths[1]))
    ids = no_lang._source(s)
    assert ids.count(tok.eos_token_id) == 1 and ids[-1] == tok.eos_token_id


def _shards_with(folder: Path, descriptions: list[str], extra: list[dict] | None = None) -> Path:
    """One shard, clip-0000.. in order, 2 frames of 32x32 each; `extra`: more sidecar fields per clip."""
    folder.mkdir(parents=True)
    path = folder / shard_name(0)
    with wds.TarWriter(str(path), mtime=0, encoder=False) as w:
        for i, desc in enumerate(descriptions):
            meta = {"video_id": f"clip-{i:04d}", "description": desc, **(extra[i] if extra else {})}
            s = {"__key__": f"clip-{i:04d}", "json": json.dumps(meta).encode(), "txt": desc.encode()}
            for t in range(2):
                buf = io.BytesIO()
                Image.fromarray(np.full((32, 32, 3), 30 * i + t, np.uint8)).save(buf, "JPEG")
                s[frame_field(t, "jpg")] = buf.getvalue()
            w.write(s)
    write_index(folder, ShardIndex((ShardEntry(path.name, len(descriptions), path.stat().st_size,
                                               sha256_file(path)),), {}))
    return folder


def test_llava_run_with_a_special_token_caption_trains_to_the_end(tmp_path):
    """The issue's reproduction: 8 clips, one description with <video> and </s>, tiny preset: exit 0."""
    shards = _shards_with(tmp_path / "shards", [f"a clip number {i}" for i in range(7)] + [NASTY])
    run = tmp_path / "run"
    vtt_train("--model", "llava", "--preset", "tiny", "--shards", shards, "--output-dir", run, "--micro-batch", 4,
              "--max-steps", 4, "--log-every", 1, "--no-export", "--set", "run.save_final=false")
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3, 4]
