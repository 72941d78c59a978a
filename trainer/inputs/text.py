"""Sample text -> token ids, with one rule: a template's own text is markup, sample text is data.

Templates (the prompt, `target_template`, `source_template`) are `str.format` strings over a sample's sidecar fields.
What the template itself says may hold markup (`<video>`, chat tokens such as `<|im_start|>`); what a field brings
in never does: a caption that says "<video>" or "</s>" is tokenised as those characters, so it can neither add a
video placeholder (LLaVA's forward would refuse the batch) nor end a sequence early.
"""
from __future__ import annotations

import re
import string

from vtt.shards.conversation import SampleError  # noqa: F401 - the one class, defined with the sample schema

# A data span: [start, end) characters of the rendered text that came from a sample field.
Span = tuple[int, int]
_FORMATTER = string.Formatter()


def template_fields(template: str, what: str = "template") -> list[str]:
    """Top-level field names a str.format template uses."""
    try:
        names = [f for _, f, _, _ in _FORMATTER.parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"{what} {template!r} is not a valid format template: {e}") from None
    if any(n == "" or n.isdigit() for n in names):
        raise ValueError(f"{what} {template!r} needs named fields like {{description}}, not positional ones")
    return [re.split(r"[.\[]", n, maxsplit=1)[0] for n in names]


def _fields(sample: dict) -> dict:
    return {**(sample.get("meta") or {}), "text": sample.get("text", ""), "key": sample.get("key", "")}


def _check_fields(template: str, sample: dict, what: str, fields: dict) -> None:
    missing = [f for f in template_fields(template, what) if fields.get(f) is None]
    if missing:
        how = "which is null in the sample" if missing[0] in fields else "which the sample lacks"
        raise SampleError(f"sample {sample.get('key', '?')!r}: {what} {template!r} needs field {missing[0]!r}, "
                          f"{how} (has: {sorted(k for k, v in fields.items() if v is not None)})")


def render_spans(template: str, sample: dict, what: str, markup: dict[str, str] | None = None
                 ) -> tuple[str, list[Span]]:
    """(rendered text, spans of field values). `markup` replaces strings in the template's own text only
    (e.g. "<video>" -> the model's placeholder token), never inside a field value."""
    fields = _fields(sample)
    _check_fields(template, sample, what, fields)
    out, spans, pos = [], [], 0
    try:
        for literal, name, spec, conv in _FORMATTER.parse(template):
            for old, new in (markup or {}).items():
                literal = literal.replace(old, new)
            out.append(literal)
            pos += len(literal)
            if name is None:
                continue
            value = _FORMATTER.convert_field(_FORMATTER.get_field(name, (), fields)[0], conv)
            value = _FORMATTER.format_field(value, _FORMATTER.format(spec, **fields) if spec else "")
            out.append(value)
            spans.append((pos, pos + len(value)))
            pos += len(value)
    except (KeyError, IndexError, AttributeError, TypeError, ValueError) as e:
        raise SampleError(f"sample {sample.get('key', '?')!r}: {what} {template!r} failed: {e!r}") from None
    return "".join(out), spans


def render(template: str, sample: dict, what: str) -> str:
    """Fill template from the sample's sidecar fields (+ text, key); missing fields name field and sample."""
    return render_spans(template, sample, what)[0]


def marks_word_starts(tokenizer) -> bool:
    """Whether the tokenizer writes a word-start marker itself at the start of every text it encodes (SentencePiece
    and its Metaspace / legacy-Llama conversions: "a" -> "▁a"); a separating space before a text it encodes on its
    own is then that marker, not a character to encode (which would add a lone "▁")."""
    first = tokenizer.convert_ids_to_tokens(tokenizer("a", add_special_tokens=False).input_ids[:1])
    return bool(first) and first[0].startswith("▁")


def _special_ids(tokenizer) -> set[int]:
    # every added token is matched by its exact string before BPE runs: all of them can be markup
    return set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_encoder.values())


def _inside(off: tuple[int, int], spans: list[Span]) -> bool:
    return off[1] > off[0] and any(off[0] < e and s < off[1] for s, e in spans)


def encode(tokenizer, text: str, data: list[Span], add_special_tokens: bool = True) -> list[int]:
    """Token ids of `text`, special tokens recognised only outside the `data` spans (see encode_offsets)."""
    return encode_offsets(tokenizer, text, data, add_special_tokens)[0]


def encode_offsets(tokenizer, text: str, data: list[Span], add_special_tokens: bool = True
                   ) -> tuple[list[int], list[tuple[int, int]]]:
    """(token ids, character span of each token) of `text`, special tokens recognised only outside `data`.

    The common case (no special-token string inside the data) is the tokenizer's own joint tokenisation,
    unchanged. Otherwise the text is cut at the markup tokens and each piece is tokenised with
    `split_special_tokens=True` (the pieces' boundaries are the markup tokens, where the tokenizer cuts
    anyway); cost stays linear in the text. Tokens the post-processor adds (BOS/EOS) span (0, 0)."""
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids, offsets, special = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]], _special_ids(tokenizer)
    if not any(i in special and _inside(o, data) for i, o in zip(ids, offsets)):
        return ids, offsets
    lead, trail = 0, len(ids)  # BOS/EOS the post-processor adds have empty offsets
    while lead < trail and offsets[lead] == (0, 0) and ids[lead] in special:
        lead += 1
    while trail > lead and offsets[trail - 1] == (0, 0) and ids[trail - 1] in special:
        trail -= 1
    out, offs, cut = ids[:lead], offsets[:lead], 0
    for i, (start, end) in zip(ids[lead:trail], offsets[lead:trail]):
        if i in special and not _inside((start, end), data):
            _add_text(tokenizer, text, cut, start, out, offs)
            out.append(i)
            offs.append((start, end))
            cut = end
    _add_text(tokenizer, text, cut, len(text), out, offs)
    return out + ids[trail:], offs + offsets[trail:]


def _add_text(tokenizer, text: str, start: int, end: int, ids: list[int], offs: list) -> None:
    if end <= start:
        return
    enc = tokenizer(text[start:end], add_special_tokens=False, split_special_tokens=True,
                    return_offsets_mapping=True)
    ids += enc["input_ids"]
    offs += [(a + start, b + start) for a, b in enc["offset_mapping"]]
