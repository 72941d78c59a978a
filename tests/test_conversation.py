"""Multi-turn conversation samples (trainer/inputs/chat.py + the LLaVA adapter): both annotation styles, the
family format and a checkpoint's own chat template, loss on exactly the learned assistant turns, history masking,
length overflow, and bad conversations failing as data through the loader's on_corrupt policy."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from vtt.shards.conversation import SampleError
from vtt.trainer.models.registry import get_adapter
from vtt.trainer.models.model_config import ModelConfig
from vtt.trainer.inputs.chat import conversation_of
from vtt.trainer.models.presets import build_tiny

sys.path.insert(0, str(Path(__file__).parent))
from prep_helpers import add_video, cfg as prep_cfg  # noqa: E402

CONV = [{"from": "system", "value": "You answer questions about videos."},
        {"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "Which way does it move?"}, {"from": "gpt", "value": "left", "loss": False},
        {"from": "human", "value": "What shape is it?"}, {"from": "gpt", "value": "a circle </s> really"}]
MESSAGES = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "\nWhat colour?"}]},
            {"role": "assistant", "content": "blue"}, {"role": "user", "content": "And the shape?"},
            {"role": "assistant", "content": "a square"}]


@pytest.fixture(scope="module")
def llava_path(tmp_path_factory):
    return str(build_tiny("llava", tmp_path_factory.mktemp("conv") / "llava"))


def sample(field="conversations", turns=CONV, key="k"):
    return {"key": key, "text": "", "frames": np.zeros((2, 16, 16, 3), np.uint8),
            "meta": {"description": "a caption", field: turns}}


def learned_texts(ad, batch, row=0) -> list[str]:
    """The decoded runs of label tokens, in order."""
    ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
    runs, cur = [], []
    for i, y in zip(ids, labels):
        if y != -100:
            assert y == i
            cur.append(i)
        elif cur:
            runs.append(ad.tokenizer.decode(cur))
            cur = []
    return runs + ([ad.tokenizer.decode(cur)] if cur else [])


def test_every_learned_assistant_turn_and_only_those_get_loss(llava_path):
    ad = get_adapter(ModelConfig(kind="llava", model_path=llava_path))
    batch = ad.collate([sample()])
    assert learned_texts(ad, batch) == [" red</s>", " a circle </s> really</s>"]  # "left" says loss: false
    ids = batch["input_ids"][0].tolist()
    assert ids.count(ad.layout.token_id) == ad.layout.num_tokens(2)  # "<image>" became the video tokens
    assert ids.count(ad.tokenizer.eos_token_id) == 3  # one per assistant turn; the answer's "</s>" is text
    masked = get_adapter(ModelConfig(kind="llava", model_path=llava_path, mask_history=True))
    assert learned_texts(masked, masked.collate([sample()])) == [" a circle </s> really</s>"]


def test_messages_style_with_content_parts_and_mixed_batch(llava_path):
    ad = get_adapter(ModelConfig(kind="llava", model_path=llava_path))
    caption = {**sample(), "meta": {"description": "a plain caption"}}
    batch = ad.collate([sample("messages", MESSAGES), caption])
    assert learned_texts(ad, batch, 0) == [" blue</s>", " a square</s>"]
    assert learned_texts(ad, batch, 1) == [" a plain caption</s>"]  # a caption sample stays what it was
    n = ad.layout.num_tokens(2)
    assert [row.tolist().count(ad.layout.token_id) for row in batch["input_ids"]] == [n, n]


def test_the_checkpoints_own_chat_template_is_used(llava_path, tmp_path):
    path = tmp_path / "templated"
    shutil.copytree(llava_path, path)
    conf = json.loads((path / "tokenizer_config.json").read_text())
    conf["chat_template"] = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
                             "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}")
    (path / "tokenizer_config.json").write_text(json.dumps(conf))
    ad = get_adapter(ModelConfig(kind="llava", model_path=str(path)))
    assert ad.tokenizer.chat_template
    batch = ad.collate([sample("messages", MESSAGES)])
    text = ad.tokenizer.decode([i for i in batch["input_ids"][0].tolist() if i != ad.layout.token_id])
    assert text.startswith("<s>[user] \nWhat colour?[assistant] blue</s>")  # HF renders with trim_blocks
    assert learned_texts(ad, batch) == [" blue</s>", " a square</s>"]


def test_a_template_over_content_parts_works_too(llava_path, tmp_path):
    """llava-hf's templates iterate `{"type": "text"}` parts of each message instead of a string content."""
    path = tmp_path / "parts"
    shutil.copytree(llava_path, path)
    conf = json.loads((path / "tokenizer_config.json").read_text())
    conf["chat_template"] = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] | "
                             "selectattr('type', 'equalto', 'text') %}{{ c['text'] }} {% endfor %}{% endfor %}"
                             "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    (path / "tokenizer_config.json").write_text(json.dumps(conf))
    ad = get_adapter(ModelConfig(kind="llava", model_path=str(path)))
    batch = ad.collate([sample("messages", MESSAGES)])
    text = ad.tokenizer.decode([i for i in batch["input_ids"][0].tolist() if i != ad.layout.token_id])
    # a template that ends an answer with no token gets the eos there: the model must learn to stop
    assert text == "<s>USER: \nWhat colour? ASSISTANT: blue</s> USER: And the shape? ASSISTANT: a square</s> "
    assert learned_texts(ad, batch) == [" blue</s>", " a square</s>"]
    items = ad.eval_items(sample("messages", MESSAGES))
    assert [i["turn"] for i in items] == [1, 3]
    assert ad.tokenizer.decode(items[1]["ids"]).endswith("And the shape? ASSISTANT:")


def test_overflow_drops_or_cuts_history_from_the_front(llava_path):
    full = get_adapter(ModelConfig(kind="llava", model_path=llava_path)).collate([sample()])
    n = int(full["attention_mask"].sum())
    drop = get_adapter(ModelConfig(kind="llava", model_path=llava_path, max_length=n - 1))
    with pytest.raises(SampleError, match=r"'k'.*over the limit.*dropped"):
        drop.collate([sample()])
    cut = get_adapter(ModelConfig(kind="llava", model_path=llava_path, max_length=n - 1, overflow="truncate_history"))
    batch = cut.collate([sample()])
    assert int(batch["attention_mask"].sum()) < n
    assert learned_texts(cut, batch) == [" a circle </s> really</s>"]  # the first exchange went, the video stayed
    assert batch["input_ids"][0].tolist().count(cut.layout.token_id) == cut.layout.num_tokens(2)


@pytest.mark.parametrize("turns,match", [
    ([{"from": "human", "value": "<video> hi"}], "no assistant turn"),
    ([{"from": "gpt", "value": "x"}, {"from": "human", "value": "<video>"}], r"\[0\]: roles out of order"),
    ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}], "placeholder .* found 0"),
    ([{"from": "human", "value": "<video><image>"}, {"from": "gpt", "value": "x"}], "found 2"),
    ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "<video>"}], r"\[1\]: .*in a assistant turn"),
    ([{"from": "robot", "value": "<video>"}], r"\[0\]: unknown role 'robot'"),
    ([{"from": "human", "value": "<video>"}, {"from": "gpt", "value": "x", "loss": False}], "no assistant turn is"),
])
def test_bad_conversations_name_sample_turn_and_reason(llava_path, turns, match):
    ad = get_adapter(ModelConfig(kind="llava", model_path=llava_path))
    with pytest.raises(SampleError, match=match):
        ad.collate([sample(turns=turns)])


def test_sidecar_conversations_reach_training_and_bad_ones_are_counted(llava_path, tmp_path):
    """Real vtt-prep output: conversations ride in the sidecar; a bad one is a counted bad_sample, not a crash."""
    from vtt.pipeline.run import run_extract
    from vtt.trainer.data.loader import DataConfig, build_loader
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        path = add_video(data, f"v{i}.mp4")
        side = json.loads(path.with_suffix(".json").read_text())
        side["conversations"] = CONV if i != 2 else [{"from": "human", "value": "<video> no answer"}]
        path.with_suffix(".json").write_text(json.dumps(side))
    assert run_extract(prep_cfg(data, tmp_path / "shards")).exit_code == 0
    ad = get_adapter(ModelConfig(kind="llava", model_path=llava_path))
    loader = build_loader(DataConfig(str(tmp_path / "shards"), shuffle_buffer=0), ad.collate, micro_batch=1)
    it = iter(loader)
    batches = [next(it) for _ in range(len(loader))]  # one epoch: every sample is met once
    assert all(b["input_ids"].shape[0] == 1 for b in batches)
    assert loader.corrupt == {"bad_sample": 1}
    assert "v2" in json.dumps(loader.corrupt_events) and "no assistant turn" in json.dumps(loader.corrupt_events)
    assert conversation_of({"meta": {"description": "x"}}) is None


# llava-hf's checkpoint templates, as transformers' convert_llava_next_video_weights_to_hf.py writes them (content
# parts; the Vicuna one ends an answer with a space and no eos, the Mistral one with a literal "<\s>" text), and
# LLaVA-OneVision's ChatML with {% generation %} marks.
HF_VICUNA = ("{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'][0]['text'] }}"
             "{% else %}{{ message['role'].upper() + ': '}}{% endif %}{% for content in message['content'] | "
             "selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{% for content in "
             "message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
             "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
HF_MISTRAL = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}{% for content in "
              "message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
              "{{' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + "
              "'<\\\\s> '}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
              "{% endfor %}")
HF_CHATML_GENERATION = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# The demo's answers: " yellow" is "Ġ y el low" for the tiny byte-level tokenizer (no "Ġy" token), the case where a
# bare boundary token used to fall on the template's side; a multi-word answer; an unlearned one.
ANSWERS = [("yellow", True), ("left", False), ("a red circle moving left", True)]
QA = [t for k, (a, loss) in enumerate(ANSWERS) for t in (
      {"from": "human", "value": ("<video>\n" if k == 0 else "") + f"question {k}?"},
      {"from": "gpt", "value": a, "loss": loss})]
LLAVA_CASES = ([(f, style, None) for f in ("llava_next_video", "video_llava", "llava", "llava_onevision")
                for style in ("bytelevel", "metaspace", "llama")] +
               [("llava_next_video", style, t) for t in ("HF_VICUNA", "HF_MISTRAL", "HF_CHATML_GENERATION")
                for style in ("bytelevel", "llama")])


def _with_tokenizer(src: Path, dst: Path, style: str, template: str | None, qwen: bool = False) -> str:
    """The tiny checkpoint with a tokenizer of `style` (same special-token ids) and chat `template`."""
    from vtt.trainer.models.presets import LLAVA_SPECIAL
    from vtt.trainer.models.presets_qwen import QWEN_CHAT_TEMPLATE, QWEN_SPECIAL
    from vtt.trainer.models.presets_tokenizer import build_tokenizer
    shutil.copytree(src, dst)
    if qwen:
        tok = build_tokenizer(QWEN_SPECIAL, bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk="<|endoftext|>",
                              add_bos=False, style=style)
        tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL[1:]})
        tok.chat_template = template or QWEN_CHAT_TEMPLATE
    else:
        tok = build_tokenizer(LLAVA_SPECIAL, bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", add_bos=True,
                              style=style)
        tok.add_special_tokens({"additional_special_tokens": ["<video>", "<image>"]})
        tok.chat_template = template
    for f in dst.glob("tokenizer*"):
        f.unlink()
    tok.save_pretrained(dst)
    return str(dst)


def _check_answers_learned_exactly(ad, sample_, video_id: int, generation_prompt: str) -> None:
    """Each learned answer's label run decodes to exactly its text + the end-of-turn token (a separating space
    may lead: it is generated); the prompt before it is the eval prompt and ends with the generation prompt."""
    batch = ad.collate([sample_])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    runs, k = [], 0
    while k < len(labels):
        if labels[k] == -100:
            k += 1
            continue
        end = next((j for j in range(k, len(labels)) if labels[j] == -100), len(labels))
        assert labels[k:end] == ids[k:end]
        runs.append((k, end))
        k = end
    eos = ad.tokenizer.eos_token
    want = [a for a, loss in ANSWERS if loss]
    got = [ad.tokenizer.decode(ids[a:b]) for a, b in runs]
    assert [g.removeprefix(" ") for g in got] == [a + eos for a in want], (got, ad.tokenizer.convert_ids_to_tokens(
        ids[runs[0][0] - 3:runs[0][1]]))
    items = {it["turn"]: it for it in ad.eval_items(sample_)}
    for (a, _), turn in zip(runs, [1, 5]):  # the learned assistant turns of QA
        tail = items[turn]["ids"][items[turn]["at"] + 1:]  # the eval prompt after the video
        assert ids[a - len(tail):a] == tail and video_id not in tail
        prompt = ad.tokenizer.decode(items[turn]["ids"])
        assert prompt.endswith(generation_prompt) and items[turn]["reference"] == ANSWERS[turn // 2][0], prompt


@pytest.mark.parametrize("family,style,template", LLAVA_CASES)
def test_llava_labels_are_exactly_each_answer_and_its_end(tmp_path, family, style, template):
    """Every LLaVA family and template, for byte-level, SentencePiece (Metaspace) and legacy-Llama tokenizers."""
    src = build_tiny("llava", tmp_path / "src", family=family)
    path = _with_tokenizer(src, tmp_path / "tok", style, globals()[template] if template else None)
    ad = get_adapter(ModelConfig(kind="llava", model_path=path))
    chatml = family == "llava_onevision" or template == "HF_CHATML_GENERATION"
    gen = "<|im_start|>assistant\n" if chatml else "[/INST]" if template == "HF_MISTRAL" else "ASSISTANT:"
    _check_answers_learned_exactly(ad, sample(turns=QA), ad.layout.token_id, gen)


@pytest.mark.parametrize("family,style", [("qwen2_vl", "bytelevel"), ("qwen2_5_vl", "bytelevel"),
                                          ("qwen3_vl", "bytelevel"), ("qwen2_5_vl", "metaspace")])
def test_qwen_labels_are_exactly_each_answer_and_its_end(tmp_path, family, style):
    src = build_tiny("qwen_vl", tmp_path / "src", family=family)
    path = _with_tokenizer(src, tmp_path / "tok", style, None, qwen=True)
    ad = get_adapter(ModelConfig(kind="qwen_vl", model_path=path))
    s = dict(sample(turns=QA), frames=np.zeros((4, 32, 32, 3), np.uint8))
    _check_answers_learned_exactly(ad, s, ad.video_id, "<|im_start|>assistant\n")


def test_system_column_and_swift_pairs_render_through_the_chat_template(tmp_path):
    """LLaMA-Factory's / ms-swift's top-level `system` is the system turn the template renders (Qwen's default
    system prompt is replaced, not added to); ms-swift's human/assistant pairs are learned like any turns."""
    ad = get_adapter(ModelConfig(kind="qwen_vl", model_path=str(build_tiny("qwen_vl", tmp_path / "q"))))
    frames = np.zeros((4, 32, 32, 3), np.uint8)
    factory = {"key": "f", "frames": frames, "meta": {"system": "You describe test patterns.", "conversations": [
        {"from": "human", "value": "<video>user instruction"}, {"from": "gpt", "value": "model response"}]}}
    swift = {"key": "s", "frames": frames, "meta": {"system": "Be brief.", "conversation": [
        {"human": "<video>What is shown?", "assistant": "A test pattern."},
        {"human": "And the colours?", "assistant": "Bars."}]}}
    for s, system, answers in ((factory, "You describe test patterns.", ["model response"]),
                               (swift, "Be brief.", ["A test pattern.", "Bars."])):
        batch = ad.collate([s])
        text = ad.tokenizer.decode([i for i in batch["input_ids"][0].tolist() if i != ad.video_id])
        assert text.startswith(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n") and \
            "You are a helpful assistant." not in text, text
        assert learned_texts(ad, batch) == [a + "<|im_end|>" for a in answers]
    both = {**factory, "meta": {**factory["meta"], "conversations": CONV}}
    with pytest.raises(SampleError, match="both a 'system' field and a system turn"):
        ad.collate([both])


@pytest.mark.parametrize("meta,match", [
    ({"messages": [{"role": "user", "content": "<video><audio>What is said?"}, {"role": "assistant", "content": "x"}],
      "videos": ["a.mp4"], "audios": ["a.mp3"]}, r"has 'audios' \(\[\"a.mp3\"\]\); vtt trains one video and text"),
    ({"messages": [{"role": "user", "content": "<video><audio>What is said?"}, {"role": "assistant", "content": "x"}]},
     r"messages\[0\]: has an <audio> placeholder"),
    ({"messages": [{"role": "user", "content": [{"type": "video"}, {"type": "audio"}]},
                   {"role": "assistant", "content": "x"}]}, r"messages\[0\]: has an audio content part"),
])
def test_audio_is_never_trained_as_text(llava_path, meta, match):
    from vtt.trainer.inputs.chat import UnsupportedSample
    ad = get_adapter(ModelConfig(kind="llava", model_path=llava_path))
    with pytest.raises(UnsupportedSample, match=match):
        ad.collate([{**sample(), "meta": meta}])
