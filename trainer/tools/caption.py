"""`vtt-caption MODEL INPUT...`: caption video files or shard samples with a model exported by vtt-train.

MODEL is RUN/final (or RUN): the exported weights plus vtt_model.json, which says how the model was trained
(kind, prompt/templates, frame settings of its shards). Video files go through vtt-prep's own frame
extraction with those settings, so the model sees frames made exactly as in training.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from pathlib import Path

import click
import numpy as np
import torch
from vtt.pipeline.extract import extract_frames
from vtt.pipeline.frames import ExtractError, FrameSpec
from vtt.shards.conversation import SampleError
from vtt.shards.sample_meta import with_provenance
from vtt.shards.format import INDEX_FILE, ShardFormatError, decode_frame
from vtt.shards.storage import StorageError, Store, is_url, parse_options
from vtt.trainer.data.loader import DataConfig, build_loader
from vtt.trainer.models.model_config import ModelConfig
from vtt.trainer.run.export import FINAL_DIR, MODEL_INFO_FILE


def model_dir(path: str | Path) -> Path:
    p = Path(path)
    if (p / FINAL_DIR / "config.json").is_file():
        p = p / FINAL_DIR
    if not (p / "config.json").is_file():
        raise click.UsageError(f"{path}: no exported model (config.json) here or in {FINAL_DIR}/")
    return p


def load_info(mdir: Path, kind: str | None) -> dict:
    """vtt_model.json, or a minimal one for a checkpoint not made by vtt-train (needs --model)."""
    p = mdir / MODEL_INFO_FILE
    if p.is_file():
        return json.loads(p.read_text())
    if not kind:
        raise click.UsageError(f"{mdir} has no {MODEL_INFO_FILE} (not exported by vtt-train): pass --model")
    return {"model": {"kind": kind}, "frames": {}}


def model_config(mdir: Path, info: dict, kind: str | None):
    """The training ModelConfig pointed at the export: LoRA is merged there, freezing is moot."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    m = {k: v for k, v in info["model"].items() if k in fields}
    m.update(model_path=str(mdir), lora=False, freeze_vision=False, freeze_llm=False, projector_only=False,
             gradient_checkpointing=False)
    if kind:
        m["kind"] = kind
    return ModelConfig(**m)


def frame_spec(settings: dict, num_frames: int | None):
    fields = {f.name for f in dataclasses.fields(FrameSpec)}
    kw = {k: (tuple(v) if k == "size" else v) for k, v in settings.items() if k in fields}
    if num_frames:
        kw.update(num_frames=num_frames, fps=None)
    return FrameSpec(**kw)


def video_sample(path: Path, spec) -> dict:
    """A sample dict like trainer/data/loader.py yields, from a video file (vtt-prep's extraction)."""
    res = extract_frames(path, spec)
    frames = np.stack([decode_frame(b) for b in res.frames])
    # the frames' real pts, as vtt-prep writes them into shards (Qwen2.5-VL/Qwen3-VL read them)
    meta = with_provenance({"video_id": path.stem, "description": ""},
                           {"timestamps": [float(t) for t in res.timestamps]})
    return {"key": path.stem, "meta": meta, "text": "", "frames": frames}


def shard_samples(folder: str, keys: tuple[str, ...], limit: int, decode_frames: bool,
                  storage_options: dict | None = None) -> list[dict]:
    """Samples of a shards folder (path or URL) in index order: the given keys, else the first `limit`."""
    cfg = DataConfig(str(folder), eval_shards=str(folder), decode_frames=decode_frames,  # eval: index order
                     storage_options=dict(storage_options or {}))
    loader = build_loader(cfg, list, micro_batch=1, split="eval")
    out, want = [], set(keys)
    for (s,) in loader:
        if (not want and len(out) < limit) or s["key"] in want:
            out.append(s)
        if (want and {x["key"] for x in out} >= want) or (not want and len(out) >= limit):
            break
    missing = want - {s["key"] for s in out}
    if missing:
        raise click.UsageError(f"{folder}: no sample(s) with key {sorted(missing)}")
    return out


@click.command(help=__doc__.split("\n\n")[0] + "\n\nINPUT: video files and/or shards folders (paths or URLs "
               "such as s3://bucket/shards).\n\nExit status: 0 every input captioned; 1 some input failed (one line "
               "each on stderr; the others are captioned); 2 bad flags, no model at MODEL, or a shards URL that "
               "cannot be reached (nothing captioned).",
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.argument("inputs", nargs=-1, required=True)
@click.option("--model", "kind", type=click.Choice(["llava", "seq2seq", "qwen_vl"]), help="Only for exports without "
              "vtt_model.json.")
@click.option("--key", "keys", multiple=True, help="Shard sample key(s) to caption [default: the first --limit].")
@click.option("--limit", default=4, show_default=True, help="Samples per shards folder.")
@click.option("--num-frames", type=int, help="Frames per video [default: as in the training shards].")
@click.option("--max-new-tokens", default=32, show_default=True)
@click.option("--batch-size", default=8, show_default=True, help="Inputs captioned together (bounds memory).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 [default: cuda if available].")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
              help="fsspec storage option for shards URLs, repeatable (endpoint_url=..., profile=..., anon=true).")
@click.version_option(package_name="vtt")
def main(model, inputs, kind, keys, limit, num_frames, max_new_tokens, batch_size, device, as_json,
         storage_options):
    try:
        options = parse_options(storage_options)
        missing = check_inputs(inputs, options)
        model_dir(model)
    except (ValueError, click.UsageError) as e:  # StorageError too: one line naming the URL, before the model loads
        click.echo(f"vtt-caption: error: {e.message if isinstance(e, click.UsageError) else e}", err=True)
        sys.exit(2 if isinstance(e, (StorageError, click.UsageError)) or "storage-option" in str(e) else 1)
    failures = []

    def report(inp: str, why: str) -> None:
        failures.append((inp, why))
        click.echo(f"vtt-caption: error: {inp}: {why}", err=True)

    for inp, why in missing:
        report(inp, why)
    good = [i for i in inputs if i not in dict(missing)]
    if good:
        for key, text in caption(model, good, kind, keys, limit, num_frames, max_new_tokens, device, options,
                                 batch_size=batch_size, on_error=report):
            click.echo(json.dumps({"key": key, "caption": text}) if as_json else f"{key}\t{text}")
    if failures:
        click.echo(f"vtt-caption: {len(failures)} of {len(inputs)} input(s) failed", err=True)
        sys.exit(1)


def check_inputs(inputs, options: dict) -> list[tuple[str, str]]:
    """(input, why) for each local input that is not there; shards URLs must be reachable (StorageError
    otherwise: nothing runs)."""
    bad = []
    for inp in inputs:
        if not is_url(inp):
            if not Path(inp).exists():
                bad.append((inp, "no such file or folder"))
            continue
        try:
            Store.of(inp, options).read_bytes(INDEX_FILE)
        except StorageError:
            raise
        except OSError:
            pass  # reachable; the loader names what is missing
    return bad


def one_line(inp: str, e: Exception) -> str:
    """An input's failure in one line, without repeating the input's path: ffmpeg's telling last stderr line
    beside vtt's message."""
    text = e.message if isinstance(e, (ExtractError, click.ClickException)) else str(e)
    text = " / ".join(x.strip() for x in text.splitlines() if x.strip())
    for prefix in (f"{inp}: ", f"{Path(inp).name}: "):
        text = text.removeprefix(prefix)
    if isinstance(e, ExtractError):
        tail = [x.strip() for x in e.stderr_tail.splitlines() if x.strip()]
        text = f"not captioned, {e.error_class}: {text}" + (f" ({tail[-1]})" if tail and tail[-1] not in text else "")
    return text


def input_errors() -> tuple[type[BaseException], ...]:
    return ExtractError, ShardFormatError, SampleError, click.UsageError, OSError


def caption(model, inputs, kind=None, keys=(), limit=4, num_frames=None, max_new_tokens=32, device=None,
            storage_options=None, batch_size: int = 8, on_error=None):
    """[(key, caption)] for every input (video files, shards folders or URLs), `batch_size` inputs per generate
    call: memory holds one batch of frames, however many inputs there are. An input that cannot be read
    (not a video, not a shards folder, a --key it lacks) raises, or with `on_error(input, why)` is reported
    there and skipped, so the good inputs are still captioned."""

    # heavy: transformers (model registry); -h stays light
    from vtt.trainer.models.registry import get_adapter
    mdir = model_dir(model)
    info = load_info(mdir, kind)
    adapter = get_adapter(model_config(mdir, info, kind))
    net = adapter.load_model().to(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def samples():
        for inp in inputs:
            try:
                if is_url(inp) or Path(inp).is_dir():
                    got = shard_samples(inp, keys, limit, adapter.needs_frames, storage_options)
                else:
                    got = [video_sample(Path(inp), frame_spec(info.get("frames") or {}, num_frames))]
            except input_errors() as e:
                if on_error is None:
                    raise
                on_error(inp, one_line(inp, e))
                continue
            yield from got

    out, batch = [], []
    for s in itertools.chain(samples(), [None]):  # None: the end, flush what is left
        batch += [s] if s is not None else []
        if batch and (s is None or len(batch) == batch_size):
            out += zip([x["key"] for x in batch], adapter.generate(net, batch, max_new_tokens=max_new_tokens))
            batch = []
    return out


if __name__ == "__main__":
    main()
