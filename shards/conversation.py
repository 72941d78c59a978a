"""The conversation schema both halves share: what `conversations` / `messages` / ms-swift `conversation` fields
in a sample (or an annotation entry) may hold, parsed into `Turn`s and validated, with no tokenizer and no torch.

Forms: LLaVA / LLaVA-Video-178K `conversations` (`[{"from": "human"|"gpt"|"system", "value": str}]`),
LLaMA-Factory / ms-swift `messages` (`[{"role": ..., "content": str}]`), ms-swift's ShareGPT `conversation`
(`[{"human": ..., "assistant": ...}]`), an optional top-level `system` string; the video placeholder (`<video>`, or
`<image>` as LLaVA-Video-178K writes it) once, in a user turn. vtt-prep checks entries with it (pipeline/annotations.py);
the trainer renders the turns with a chat template (trainer/inputs/chat.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

FROM_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
PLACEHOLDERS = ("<video>", "<image>")


class SampleError(ValueError):
    """A sample the model cannot take; the message names the sample key and the problem."""


@dataclass(frozen=True)
class Turn:
    role: str   # system | user | assistant
    text: str
    loss: bool = True  # assistant turns: learn this answer


class UnsupportedSample(SampleError):
    """A sample that asks for what vtt does not train (audio, several videos): data, never silently dropped."""


AUDIO = "<audio>"
SUPPORTED = "vtt trains one video and text per sample"


def _turn(item, i: int, field: str, key: str) -> Turn:
    where = f"sample {key!r}: {field}[{i}]"
    if not isinstance(item, dict):
        raise SampleError(f"{where}: expected an object, got {type(item).__name__}")
    role = item.get("from") if field == "conversations" else item.get("role")
    text = item.get("value") if field == "conversations" else item.get("content")
    if isinstance(text, list):  # content parts: [{"type": "video"}, {"type": "text", "text": ...}]
        kinds = [p.get("type") for p in text if isinstance(p, dict)]
        if "audio" in kinds:
            raise UnsupportedSample(f"{where}: has an audio content part; {SUPPORTED} (no audio)")
        text = "".join("<video>" if p.get("type") == "video" else str(p.get("text", "")) for p in text
                       if isinstance(p, dict))
    if role not in FROM_ROLES:
        raise SampleError(f"{where}: unknown role {role!r} (one of {sorted(FROM_ROLES)})")
    if not isinstance(text, str):
        raise SampleError(f"{where}: the text must be a string, got {type(text).__name__}")
    if AUDIO in text:
        raise UnsupportedSample(f"{where}: has an {AUDIO} placeholder; {SUPPORTED} (no audio): drop the audio "
                                "from the entry or leave the entry out")
    loss = item.get("loss", True)
    if not isinstance(loss, bool):
        raise SampleError(f"{where}: \"loss\" must be true or false, got {loss!r}")
    return Turn(FROM_ROLES[role], text, loss)


def _swift_pairs(raw, key: str) -> list[dict]:
    """ms-swift's ShareGPT form `[{"human": q, "assistant": a}, ...]` as messages."""
    out = []
    for i, pair in enumerate(raw):
        if not isinstance(pair, dict) or not isinstance(pair.get("human"), str) or \
                not isinstance(pair.get("assistant"), str):
            raise SampleError(f"sample {key!r}: conversation[{i}]: expected {{\"human\": text, \"assistant\": "
                              f"text}}, got {json_preview(pair)}")
        out += [{"role": "user", "content": pair["human"]}, {"role": "assistant", "content": pair["assistant"]}]
    return out


def json_preview(value, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


def conversation_field(meta: dict) -> str | None:
    """Which field holds the conversation: LLaVA/LLaMA-Factory `conversations`, `messages`, ms-swift's ShareGPT
    `conversation` (human/assistant pairs); None for a caption sample."""
    return next((f for f in ("conversations", "messages", "conversation") if f in meta), None)


def conversation_of(sample: dict) -> list[Turn] | None:
    """The sample's validated turns, or None for a caption sample (no conversation field). A top-level `system`
    string (LLaMA-Factory's system column, ms-swift's ShareGPT `system`) is the system turn. Audio (an `audios`
    field, an <audio> placeholder or part) raises UnsupportedSample."""
    meta, key = sample.get("meta") or {}, sample.get("key", "?")
    field = conversation_field(meta)
    if field is None:
        return None
    for name in ("audios", "audio"):
        if meta.get(name):
            raise UnsupportedSample(f"sample {key!r}: has {name!r} ({json_preview(meta[name], 60)}); {SUPPORTED} "
                                    "(no audio): drop the audio from the entry or leave the entry out")
    raw = meta[field]
    if not isinstance(raw, list) or not raw:
        raise SampleError(f"sample {key!r}: {field} must be a non-empty list")
    if field == "conversation":
        raw, field = _swift_pairs(raw, key), "messages"
    turns = [_turn(item, i, field, key) for i, item in enumerate(raw)]
    check_order(turns, f"sample {key!r}: {field}")
    system = meta.get("system")
    if system is None or system == "":  # LLaMA-Factory: an empty system column means the template's default
        return turns
    if not isinstance(system, str):
        raise SampleError(f"sample {key!r}: 'system' must be a string, got {type(system).__name__}")
    if turns[0].role == "system":
        raise SampleError(f"sample {key!r}: has both a 'system' field and a system turn in {field}; keep one")
    return [Turn("system", system)] + turns


def check_order(turns: list[Turn], where: str) -> None:
    """[system] then user/assistant alternating, from user, ending with an assistant turn; one placeholder."""
    body = turns[1:] if turns and turns[0].role == "system" else turns
    for i, t in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if t.role != want:
            n = i + len(turns) - len(body)
            raise SampleError(f"{where}[{n}]: roles out of order: {t.role} where a {want} turn must come "
                              "(an optional system turn first, then user and assistant in turn)")
    if not body or body[-1].role != "assistant":
        raise SampleError(f"{where}: has no assistant turn to learn from" if len(body) < 2 else
                          f"{where}: ends with a user turn that has no answer")
    found = [(i, p) for i, t in enumerate(turns) for p in PLACEHOLDERS for _ in range(t.text.count(p))]
    if len(found) != 1:
        raise SampleError(f"{where}: the video placeholder ({' or '.join(PLACEHOLDERS)}) must appear once, in a "
                          f"user turn; found {len(found)}" + (f" (in turns {[i for i, _ in found]})" if found else ""))
    if turns[found[0][0]].role != "user":
        raise SampleError(f"{where}[{found[0][0]}]: the video placeholder is in a {turns[found[0][0]].role} turn, "
                          "it belongs in a user turn")
