"""Offline tokenizers for the tiny presets: a byte-level BPE trained in milliseconds on a built-in corpus.

Byte-level means every string encodes and decodes losslessly, so captions with words outside the corpus
still work; the corpus only decides which words get short encodings.
"""
from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# Words that captions (sample data, real sidecars) and the seq2seq demo use, so the tiny models see short sequences.
_EN = """a an the this that these is are was were it its of in on at to from with and or but not no one two three
four five six seven eight nine ten video clip shows showing shot scene frame frames camera close up wide view
red green blue yellow orange purple pink white black gray grey brown dark light bright colour color colours colors
square circle triangle rectangle ball box line stripe stripes dot dots shape shapes pattern gradient noise
moving moves move slowly quickly fast slow left right up down across around toward towards away rotating rotates
spinning spins bouncing bounces falling falls rising rises growing shrinking zoom zooming pan panning tilt still
static background foreground center centre middle top bottom corner edge side over under behind front next
person people man woman child dog cat bird car street road city building tree trees sky water sea river beach
sun cloud clouds rain snow night day morning evening indoor outdoor room kitchen table hand hands face walking
running sitting standing talking playing holding looking phone screen text title test pattern bars counter
describe description caption summary what happens happening happened in the video please answer
USER ASSISTANT SYSTEM"""
_FR = """le la les un une des de du et est sont dans sur avec vidéo rouge vert bleu jaune blanc noir carré cercle
qui se déplace vers gauche droite haut bas lentement rapidement une balle"""
_DE = """der die das ein eine und ist sind mit auf im Video rot grün blau gelb weiß schwarz Quadrat Kreis das sich
bewegt nach links rechts oben unten langsam schnell ein Ball"""
CORPUS = [line for block in (_EN, _FR, _DE) for line in block.splitlines()]


STYLES = ("bytelevel", "metaspace", "llama")


def build_tokenizer(special_tokens: list[str], *, vocab_size: int = 512,
                    bos: str | None, eos: str, pad: str, unk: str, add_bos: bool,
                    corpus: list[str] | None = None, style: str = "bytelevel") -> PreTrainedTokenizerFast:
    """Train a BPE whose first ids are `special_tokens` in order (so configs can hard-code them).

    style 'bytelevel' (GPT-2/Qwen-like, lossless), 'metaspace' (SentencePiece converted the current way: "▁word"
    pieces, a "▁" prepended to the first word; chars outside the corpus become unk) or 'llama' (SentencePiece as
    the legacy Llama/Vicuna tokenizer.json lays it out, which llava-hf's LLaVA checkpoints ship: a normalizer that
    prepends "▁" to every text and turns spaces into "▁", no pre-tokenizer, a decoder that strips one leading
    space) - the ways real LLaVA tokenizers mark word boundaries."""
    if style not in STYLES:
        raise ValueError(f"tokenizer style {style!r} is not one of {STYLES}")
    if style == "bytelevel":
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token=unk))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = sorted(set(string.printable) | {c for line in (corpus or CORPUS) for c in line})
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=alphabet, show_progress=False)
    text = corpus or CORPUS
    # Each corpus line also appears with a leading space: ByteLevel keeps the space inside the word token.
    tok.train_from_iterator(text + [" " + t for t in text], trainer=trainer)
    if style == "llama":  # trained on words (as SentencePiece splits by whitespace), encoded as legacy Llama
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = None
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    if add_bos and bos:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token=unk, clean_up_tokenization_spaces=False)
    return fast
