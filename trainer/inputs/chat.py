"""Multi-turn conversations in samples: render with a chat template, mark what the loss sees (the schema, parsing
and validation live in vtt.shards.conversation, shared with vtt-prep; re-exported here).

A sample's metadata may carry `conversations` (LLaVA / LLaVA-Video-178K: `[{"from": "human"|"gpt"|"system",
"value": str}]`) or `messages` (LLaMA-Factory / ms-swift: `[{"role": "system"|"user"|"assistant", "content": str}]`),
with the video placeholder (`<video>`, or `<image>` as LLaVA-Video-178K writes it) once, in a user turn. A turn may
say `"loss": false`. Rendering uses the checkpoint's own chat template when it has one, else the family's format
(FAMILY_TEMPLATES); message text stays data (vtt.trainer.inputs.text), only the placeholder becomes markup.
What the loss sees is what the model must generate: from the end of the template's generation prompt (a space the
template puts between "ASSISTANT:" and the answer is the answer's) through the end-of-turn token; the text is
tokenised in segments cut there, so no token straddles prompt and answer, and eval prompts are training prefixes.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from vtt.shards.conversation import (AUDIO, FROM_ROLES, PLACEHOLDERS, SUPPORTED, SampleError, Turn,  # noqa: F401
                                      UnsupportedSample, check_order, conversation_field, conversation_of,
                                      json_preview)
from vtt.trainer.inputs.text import Span, encode_offsets, marks_word_starts

# The llava-hf formats: Vicuna-style for LLaVA-NeXT-Video / Video-LLaVA / LLaVA-1.5, ChatML for OneVision (Qwen2).
_VICUNA = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }} "
           "{% elif m['role'] == 'user' %}USER: {{ m['content'] }} {% else %}ASSISTANT: {{ m['content'] }}"
           "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
_CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
FAMILY_TEMPLATES = {"llava_next_video": _VICUNA, "video_llava": _VICUNA, "llava": _VICUNA, "llava_onevision": _CHATML}
OVERFLOW = ("drop", "truncate_history")


def learned(turns: list[Turn], mask_history: bool) -> list[Turn]:
    """Loss flags as trained: every assistant turn that allows it, or with mask_history the last one only."""
    if not mask_history:
        return turns
    last = max(i for i, t in enumerate(turns) if t.role == "assistant")
    return [replace(t, loss=t.loss and i == last) if t.role == "assistant" else t for i, t in enumerate(turns)]


def drop_oldest_exchange(turns: list[Turn]) -> list[Turn] | None:
    """History cut from the front: the oldest user/assistant pair goes (its placeholder moves to the next user
    turn, so the video stays); None when only one exchange is left."""
    first = 1 if turns[0].role == "system" else 0
    if len(turns) - first <= 2:
        return None
    user, rest = turns[first], turns[first + 2:]
    for p in PLACEHOLDERS:
        if p in user.text:
            rest = [replace(rest[0], text=f"{p}\n{rest[0].text}")] + rest[1:]
    return turns[:first] + rest


def fit_turns(key: str, turns: list[Turn], encode, limit: int | None, mask_history: bool, overflow: str
              ) -> tuple[list[int], list[int]]:
    """`encode(learned turns) -> (ids, labels)` within `limit` tokens, by `overflow`: drop (a SampleError, which
    the data's on_corrupt policy counts) or cut history exchanges from the front. Never a sample without any
    learned token. Cost: one encode per history exchange cut."""
    while True:
        ids, labels = encode(learned(turns, mask_history))
        if not limit or len(ids) <= limit:
            break
        shorter = drop_oldest_exchange(turns) if overflow == "truncate_history" else None
        if shorter is None:
            raise SampleError(f"sample {key!r}: {len(ids)} tokens with its video, over the limit of {limit} "
                              f"(model.max_length / the model's positions; model.overflow={overflow}): dropped; "
                              f"fewer frames (--num-frames) or model.overflow=truncate_history make it fit")
        turns = shorter
    if all(y == -100 for y in labels):
        raise SampleError(f"sample {key!r}: no assistant turn is learned (all have \"loss\": false)")
    return ids, labels


def _sentinel(i: int) -> str:
    return f"VTTTURN{i:04d}X"  # survives templates that trim or case-fold nothing


@dataclass(frozen=True)
class Answer:
    """An assistant turn in the rendered text: `span` = [start, end) characters the model must generate there:
    from the end of the generation prompt (what the template writes for `add_generation_prompt` before this turn;
    so a separating space the template puts before the answer is the answer's) through the end-of-turn token."""
    turn: int
    span: Span
    learned: bool


def render(tokenizer, turns: list[Turn], template: str, placeholder: str, add_generation_prompt: bool = False
           ) -> tuple[str, list[Span], list[Answer]]:
    """(text, data spans, answers). Each message is rendered through `template` as a sentinel, then put back
    verbatim: its text is data, except the video placeholder (-> `placeholder`, markup). An assistant turn ends with
    the end-of-turn token the template writes after it (whitespace between allowed), else the tokenizer's eos is
    written there: a model must learn to stop. Cost: one template render per distinct turn layout (cached)."""
    shell = _shell(tokenizer, turns, template, add_generation_prompt)
    specials = sorted(set(tokenizer.all_special_tokens) | set(tokenizer.added_tokens_encoder), key=len, reverse=True)
    out, data, answers, pos, length = [], [], [], 0, 0
    for i, t in enumerate(turns):
        at = shell.find(_sentinel(i), pos)
        if at < 0:
            raise ValueError(f"the chat template does not render message {i} verbatim; vtt cannot mark its tokens")
        prompt_end = _prompt_end(tokenizer, turns, i, template, shell, pos, at) if t.role == "assistant" else at
        out.append(shell[pos:at])
        start, length = length + prompt_end - pos, length + at - pos
        for piece, is_data in _split_placeholder(t.text, placeholder):
            out.append(piece)
            if is_data and piece:
                data.append((length, length + len(piece)))
            length += len(piece)
        pos = at + len(_sentinel(i))
        if t.role == "assistant":
            rest = shell[pos:]
            gap = len(rest) - len(rest.lstrip())
            tail = next((rest[:gap + len(s)] for s in specials if s and rest.startswith(s, gap)), None)
            if tail is None:  # the template ends the turn with no token (llava-hf's inference templates)
                tail = tokenizer.eos_token or ""
                out.append(tail)
            else:
                out.append(tail)
                pos += len(tail)
            length += len(tail)
            answers.append(Answer(i, (start, length), t.loss))
    out.append(shell[pos:])
    return "".join(out), data, answers


def _prompt_end(tokenizer, turns: list[Turn], i: int, template: str, shell: str, pos: int, at: int) -> int:
    """Where in `shell` the prompt before assistant turn i ends: at the generation prompt's end (the template over
    turns[:i] with add_generation_prompt, where that is a prefix of the whole rendering), but never before the
    whitespace that leads into the message (a template with no generation prompt, or one whose history depends on
    what follows: the role header stays prompt, the separating space goes with the answer)."""
    between = shell[pos:at]
    lead = at - (len(between) - len(between.rstrip()))
    prompt = _shell(tokenizer, turns[:i], template, True)
    return max(lead, len(prompt)) if pos <= len(prompt) <= at and shell.startswith(prompt) else lead


def encode(tokenizer, text: str, data: list[Span], answers: list[Answer], add_special_tokens: bool
           ) -> tuple[list[int], list[int], list[int]]:
    """(ids, labels, first token index of each answer). The text is tokenised in segments cut at every answer's
    bounds, so no token straddles a prompt and an answer: an answer's first token (a byte-level "Ġ", a
    SentencePiece "▁") is the answer's, and the prompt before answer k is exactly what generation starts from.
    A tokenizer that writes its own word-start marker gets a segment's one leading space as that marker.
    Labels are the learned answers' ids, -100 elsewhere. Cost: linear in the text."""
    cuts = sorted({0, len(text)} | {x for a in answers for x in a.span})
    learned = {a.span[0] for a in answers if a.learned}
    starts_at = {a.span[0]: k for k, a in enumerate(answers)}
    marker = marks_word_starts(tokenizer)
    ids, labels, starts = [], [], [0] * len(answers)
    for a, b in zip(cuts, cuts[1:]):
        if a in starts_at:
            starts[starts_at[a]] = len(ids)
        at = a + 1 if marker and a > 0 and text.startswith(" ", a) else a
        seg_data = [(max(s, at) - at, min(e, b) - at) for s, e in data if s < b and at < e]
        seg, _ = encode_offsets(tokenizer, text[at:b], seg_data, add_special_tokens=add_special_tokens and a == 0)
        ids += seg
        labels += seg if a in learned else [-100] * len(seg)
    return ids, labels, starts


_CONTENT_FORM: dict[str, bool] = {}  # template -> whether it takes content parts (learned on first use)
_SHELLS: dict[tuple, str] = {}  # (special tokens, template, roles, generation prompt) -> shell; bounded below


def _shell(tokenizer, turns: list[Turn], template: str, add_generation_prompt: bool) -> str:
    """The template rendered over sentinels, which depends on the roles only: cached per layout."""
    key = (str(tokenizer.special_tokens_map), template, tuple(t.role for t in turns), add_generation_prompt)
    if key not in _SHELLS:
        if len(_SHELLS) > 4096:
            _SHELLS.clear()
        _SHELLS[key] = _render_shell(tokenizer, turns, template, add_generation_prompt)
    return _SHELLS[key]


def _render_shell(tokenizer, turns: list[Turn], template: str, add_generation_prompt: bool) -> str:
    """String contents, or content parts for templates that iterate `{"type": "text"}` parts (the llava-hf
    ones); the first that keeps every sentinel."""
    shell = ""
    known = _CONTENT_FORM.get(template)
    for parts in (known, not known) if known is not None else (False, True):
        messages = [{"role": t.role, "content": [{"type": "text", "text": _sentinel(i)}] if parts else _sentinel(i)}
                    for i, t in enumerate(turns)]
        try:
            shell = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
        except Exception:  # a template that needs the other content form may raise on this one
            continue
        if all(_sentinel(i) in shell for i in range(len(turns))):
            _CONTENT_FORM[template] = parts  # one render per sample from now on
            return shell
    return shell  # render() names the message it cannot find


def _split_placeholder(text: str, placeholder: str) -> list[tuple[str, bool]]:
    for p in PLACEHOLDERS:
        if p in text:
            before, _, after = text.partition(p)
            return [(before, True), (placeholder, False), (after, True)]
    return [(text, True)]


def encode_conversation(tokenizer, turns: list[Turn], template: str, placeholder: str,
                        add_generation_prompt: bool = False, add_special_tokens: bool | None = None
                        ) -> tuple[list[int], list[int], list[Answer], list[int]]:
    """(ids, labels, answers, first token index of each answer) of turns rendered through `template`. The
    tokenizer's own specials (BOS) are added unless the template wrote them (`add_special_tokens=None`)."""
    text, data, answers = render(tokenizer, turns, template, placeholder, add_generation_prompt)
    if add_special_tokens is None:
        add_special_tokens = not (tokenizer.bos_token and text.startswith(tokenizer.bos_token))
    ids, labels, starts = encode(tokenizer, text, data, answers, add_special_tokens)
    return ids, labels, answers, starts
