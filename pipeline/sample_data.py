"""Built-in sample set: tiny synthetic clips + JSON sidecars, drawn by ffmpeg's lavfi at run time.

Each clip shows one coloured shape sliding across a plain grey background. The description names
colour, shape and direction ("a red circle moving left"), so a captioner must look at appearance
(colour, shape) and at time (direction). With motion="cross" (default) the shape travels most of
the way from one edge to the other: where it is in one frame says nothing without knowing which
frame that is (right-hand side: start of "left" or end of "right"). motion="wrap" moves it around a
torus from a uniform start, the harder variant. The sidecar also carries a French
rendering (`description_fr`), a deterministic function of the metadata that seq2seq learns.

Held-out clips are drawn with other random positions, speeds, sizes and backgrounds than any
training clip, and a part of them (`unseen_fraction`) shows colour/shape/direction combinations
that no training clip shows (every single value still appears in training).
"""
from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import subprocess
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vtt.shards.format import atomic_write_bytes

COLOURS = {"red": "0xE02020", "green": "0x20B020", "blue": "0x2040F0", "yellow": "0xE8E020"}
SHAPES = ("square", "circle", "triangle", "ring", "cross")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
ATTRIBUTES = ("colour", "shape", "direction")
_FR_COLOUR = {"red": "rouge", "green": "vert", "blue": "bleu", "yellow": "jaune"}
_FR_SHAPE = {"square": "carré", "circle": "cercle", "triangle": "triangle", "ring": "anneau", "cross": "croix"}
_FR_DIRECTION = {"left": "vers la gauche", "right": "vers la droite", "up": "vers le haut",
                 "down": "vers le bas"}
# geq alpha masks on an s x s tile; c = (s-1)/2 is the tile centre.
_ALPHA = {
    "square": "255",
    "circle": "if(lte(hypot(X-{c},Y-{c}),{r}),255,0)",
    "triangle": "if(lte(abs(X-{c})*2,Y+1),255,0)",  # apex up, base along the bottom row
    "ring": "if(between(hypot(X-{c},Y-{c}),{r}-{t},{r}),255,0)",  # hollow: background in the middle
    "cross": "if(lte(abs(X-{c}),{t})+lte(abs(Y-{c}),{t}),255,0)",  # plus sign: empty corners
}


@dataclass(frozen=True)
class SampleSpec:
    """How the clips look. Defaults keep extraction and training of ~100 clips to seconds."""
    size: int = 64                    # square frame, pixels
    fps: int = 10
    duration: float = 2.0
    # One size and one grey by default: with them varying, the tiny demo model memorised shapes per clip
    # instead of learning them (held-out shape accuracy at chance); with them fixed it generalises.
    object_size: tuple[int, int] = (28, 28)   # min, max side of the shape, pixels
    motion: str = "cross"             # cross: edge to edge | wrap: around the frame from anywhere
    travel: tuple[float, float] = (0.7, 1.0)   # cross: share of (size - object) covered in the clip
    speed: tuple[float, float] = (22.0, 32.0)  # wrap: px/s
    background: tuple[int, int] = (0x60, 0x60)  # grey level range
    colours: tuple[str, ...] = tuple(COLOURS)
    shapes: tuple[str, ...] = ("square", "circle", "triangle")
    directions: tuple[str, ...] = tuple(DIRECTIONS)
    unseen_combos: int = 6            # colour/shape/direction combos kept out of training
    unseen_fraction: float = 0.5      # share of held-out clips drawn from those combos
    clips_per_process: int = 16       # ffmpeg start-up (~0.2 s) is paid once per batch
    ffmpeg: str = "ffmpeg"
    timeout_s: float = 120.0

    def __post_init__(self):
        if self.size < 16 or self.fps < 1 or self.duration <= 0:
            raise ValueError(f"SampleSpec: size>=16, fps>=1, duration>0 required, got "
                             f"{self.size}, {self.fps}, {self.duration}")
        lo, hi = self.object_size
        if not 4 <= lo <= hi <= self.size // 2:
            raise ValueError(f"SampleSpec.object_size {self.object_size}: need 4 <= min <= max <= size/2")
        for name, values, known in (("colours", self.colours, COLOURS), ("shapes", self.shapes, SHAPES),
                                    ("directions", self.directions, DIRECTIONS)):
            unknown = set(values) - set(known)
            if not values or unknown:
                raise ValueError(f"SampleSpec.{name}: unknown or empty {sorted(unknown) or values}; "
                                 f"choose from {list(known)}")
        if not 0 <= self.unseen_combos < self.num_combos:
            raise ValueError(f"SampleSpec.unseen_combos={self.unseen_combos}: must be in [0, {self.num_combos})")
        if not 0.0 <= self.unseen_fraction <= 1.0:
            raise ValueError(f"SampleSpec.unseen_fraction={self.unseen_fraction}: must be in [0, 1]")
        if self.motion not in ("cross", "wrap"):
            raise ValueError(f"SampleSpec.motion={self.motion!r}: must be 'cross' or 'wrap'")
        if not 0 < self.travel[0] <= self.travel[1] <= 1:
            raise ValueError(f"SampleSpec.travel {self.travel}: need 0 < min <= max <= 1")
        if self.clips_per_process < 1:
            raise ValueError("SampleSpec.clips_per_process must be >= 1")

    @property
    def num_combos(self) -> int:
        return len(self.colours) * len(self.shapes) * len(self.directions)


# The demo's question answering: one question per attribute, in a per-clip order (Clip.conversation).
QUESTIONS = {"colour": "What colour is the shape?", "shape": "What shape is it?", "direction": "Which way does it move?"}


@dataclass(frozen=True)
class Clip:
    """One planned clip: everything that determines its pixels and its sidecar."""
    video_id: str
    split: str          # train | heldout
    colour: str
    shape: str
    direction: str
    unseen_combo: bool
    side: int           # object side, px
    speed: float        # px/s
    start: tuple[int, int]  # top-left corner at t=0 (before wrapping)
    background: int     # grey level
    motion: str = "cross"

    @property
    def description(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction}"

    @property
    def description_fr(self) -> str:
        return (f"un {_FR_SHAPE[self.shape]} {_FR_COLOUR[self.colour]} qui se déplace "
                f"{_FR_DIRECTION[self.direction]}")

    def conversation(self) -> list[dict]:
        """Colour, shape and direction asked in an order of the clip's own (so an answer depends on its question),
        LLaVA-style; the video comes with the first question."""
        order = random.Random(f"vtt-qa:{self.video_id}").sample(list(QUESTIONS), len(QUESTIONS))
        turns = []
        for i, attr in enumerate(order):
            turns += [{"from": "human", "value": ("<video>\n" if i == 0 else "") + QUESTIONS[attr]},
                      {"from": "gpt", "value": getattr(self, attr)}]
        return turns

    def sidecar(self, spec: SampleSpec) -> dict:
        return {
            "video_id": self.video_id, "description": self.description, "conversations": self.conversation(),
            "description_fr": self.description_fr, "split": self.split,
            "colour": self.colour, "shape": self.shape, "direction": self.direction,
            "unseen_combo": self.unseen_combo, "object_px": self.side,
            "speed_px_s": self.speed, "start_xy": list(self.start), "motion": self.motion,
            "background_grey": self.background,
            "generator": {"tool": "vtt.pipeline.sample_data", "size": spec.size, "fps": spec.fps,
                          "duration": spec.duration},
        }


@dataclass(frozen=True)
class SampleSet:
    """What make_sample_data wrote: one folder per split, videos with sidecars side by side."""
    root: Path
    train_dir: Path
    heldout_dir: Path
    clips: tuple[Clip, ...] = field(repr=False)
    unseen: tuple[tuple[str, str, str], ...] = ()   # combos kept out of training

    def split(self, name: str) -> list[Clip]:
        return [c for c in self.clips if c.split == name]


def all_combos(spec: SampleSpec) -> list[tuple[str, str, str]]:
    return list(itertools.product(spec.colours, spec.shapes, spec.directions))


def pick_unseen(spec: SampleSpec, rng: random.Random) -> list[tuple[str, str, str]]:
    """Combos to keep out of training, chosen so every single value still occurs in training."""
    combos = all_combos(spec)
    for _ in range(1000):
        unseen = rng.sample(combos, spec.unseen_combos)
        seen = [c for c in combos if c not in unseen]
        values = (spec.colours, spec.shapes, spec.directions)
        # spread the kept-out combos over the values so that no value is starved in training
        spread = all(max(Counter(c[i] for c in unseen).values(), default=0)
                     <= -(-spec.unseen_combos // len(vals)) for i, vals in enumerate(values))
        if spread and all({c[i] for c in seen} == set(vals) for i, vals in enumerate(values)):
            return sorted(unseen)
    raise ValueError(f"cannot keep {spec.unseen_combos} combos out and still show every value in training")


def _draw(combo, split: str, unseen: bool, index: int, spec: SampleSpec, rng: random.Random) -> Clip:
    colour, shape, direction = combo
    side = rng.randint(*spec.object_size)
    room = spec.size - side  # top-left positions that keep the shape wholly in the frame
    across = rng.randint(0, room)
    if spec.motion == "wrap":  # anywhere on the cycle, which includes partly hidden positions
        along, speed = rng.randrange(spec.size + side), round(rng.uniform(*spec.speed), 1)
    else:
        dist = round(room * rng.uniform(*spec.travel))
        slack = rng.randint(0, room - dist)
        forward = sum(DIRECTIONS[direction]) > 0  # right/down: start near 0
        along, speed = (slack if forward else room - slack), round(dist / spec.duration, 2)
    start = (along, across) if DIRECTIONS[direction][0] else (across, along)
    return Clip(video_id=f"{split}_{index:04d}", split=split, colour=colour, shape=shape,
                direction=direction, unseen_combo=unseen, side=side, speed=speed, start=start,
                background=rng.randint(*spec.background), motion=spec.motion)


def _look(clip: Clip) -> tuple:
    """Everything that decides a clip's pixels."""
    return (clip.colour, clip.shape, clip.direction, clip.side, clip.speed, clip.start, clip.background,
            clip.motion)


def plan_clips(n_train: int, n_heldout: int, seed: int, spec: SampleSpec) -> SampleSet:
    """Every clip's parameters, deterministic in `seed`. Training combos are balanced (cycled)."""
    if n_train < 1 or n_heldout < 0:
        raise ValueError(f"n_train must be >= 1 and n_heldout >= 0, got {n_train}, {n_heldout}")
    # one generator per purpose, so that changing a count never redraws the other split's clips
    unseen = pick_unseen(spec, random.Random(f"{seed}:unseen"))
    seen = [c for c in all_combos(spec) if c not in unseen]
    clips, order, rng = [], [], random.Random(f"{seed}:train")
    for i in range(n_train):
        if not order:
            order = rng.sample(seen, len(seen))
        clips.append(_draw(order.pop(), "train", False, i, spec, rng))
    rng = random.Random(f"{seed}:heldout")
    n_unseen = round(n_heldout * spec.unseen_fraction) if unseen else 0
    trained = {_look(c) for c in clips}
    for i in range(n_heldout):
        is_unseen = i < n_unseen
        pool = unseen if is_unseen else seen
        combo = pool[i % len(pool)] if is_unseen else rng.choice(pool)
        clip = _draw(combo, "heldout", is_unseen, i, spec, rng)
        while _look(clip) in trained:  # a held-out clip is never a copy of a training clip
            clip = _draw(combo, "heldout", is_unseen, i, spec, rng)
        clips.append(clip)
    return SampleSet(root=Path(), train_dir=Path(), heldout_dir=Path(), clips=tuple(clips),
                     unseen=tuple(unseen))


def clip_filter(clip: Clip, spec: SampleSpec, label: str) -> str:
    """lavfi graph drawing `clip` into output pad [label]: grey canvas + shape tile overlaid."""
    s, d = clip.side, spec.duration
    c = (s - 1) / 2
    alpha = _ALPHA[clip.shape].format(c=c, r=s / 2, t=max(2, s // 5))
    dx, dy = DIRECTIONS[clip.direction]
    period = spec.size + s  # the object leaves one edge fully before it re-enters the other
    # mod() in ffmpeg's eval floors, so it stays non-negative for negative velocities too
    if clip.motion == "wrap":
        pos = [f"mod({p0}+{k * clip.speed}*t+{period * 8},{period})-{s}" if k else f"{p0}"
               for p0, k in zip(clip.start, (dx, dy))]
    else:
        pos = [f"{p0}+{k * clip.speed}*t" if k else f"{p0}" for p0, k in zip(clip.start, (dx, dy))]
    grey = f"0x{clip.background:02X}{clip.background:02X}{clip.background:02X}"
    return (f"color=c={grey}:s={spec.size}x{spec.size}:r={spec.fps}:d={d}[bg{label}];"
            f"color=c={COLOURS[clip.colour]}:s={s}x{s}:r={spec.fps}:d={d},format=rgba,"
            f"geq=r='r(X,Y)':g='g(X,Y)':b='b(X,Y)':a='{alpha}'[fg{label}];"
            f"[bg{label}][fg{label}]overlay=x='{pos[0]}':y='{pos[1]}':shortest=1,"
            f"format=yuv420p[{label}]")


def _encode_batch(batch: list[tuple[Clip, Path]], spec: SampleSpec) -> None:
    """One ffmpeg process writes a batch of clips to temp names; rename only after success."""
    graph = ";".join(clip_filter(clip, spec, f"v{i}") for i, (clip, _) in enumerate(batch))
    cmd = [spec.ffmpeg, "-hide_banner", "-nostdin", "-v", "error", "-y", "-filter_complex", graph]
    tmps = [path.with_name(f".tmp-{path.name}") for _, path in batch]
    for i, tmp in enumerate(tmps):
        cmd += ["-map", f"[v{i}]", "-c:v", "libx264", "-preset", "ultrafast", "-crf", "18",
                "-g", str(spec.fps), "-threads", "1", "-f", "mp4", str(tmp)]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=spec.timeout_s)
    except subprocess.TimeoutExpired as e:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        raise RuntimeError(f"sample data: ffmpeg timed out after {spec.timeout_s}s writing "
                           f"{batch[0][1].parent}") from e
    if proc.returncode != 0:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        tail = proc.stderr.decode(errors="replace")[-2000:]
        raise RuntimeError(f"sample data: ffmpeg failed ({proc.returncode}) writing "
                           f"{[str(p) for _, p in batch]}: {tail}")
    for tmp, (_, path) in zip(tmps, batch):
        tmp.replace(path)


def _sidecar_bytes(clip: Clip, spec: SampleSpec) -> bytes:
    return (json.dumps(clip.sidecar(spec), indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode()


def make_sample_data(out_dir, n_train: int = 96, n_heldout: int = 32, seed: int = 0,
                     spec: SampleSpec = SampleSpec()) -> SampleSet:
    """Write `out_dir/train/*.mp4|json` and `out_dir/heldout/*.mp4|json`; returns the plan.

    Reruns with the same arguments keep clips whose video and sidecar already match, so the
    demo's second run does no ffmpeg work; a clip whose sidecar differs is redrawn.
    """
    if shutil.which(spec.ffmpeg) is None:
        raise RuntimeError(f"sample data: ffmpeg not found ({spec.ffmpeg!r}); install ffmpeg first")
    plan = plan_clips(n_train, n_heldout, seed, spec)
    root = Path(out_dir)
    dirs = {"train": root / "train", "heldout": root / "heldout"}
    todo = []
    for clip in plan.clips:
        dirs[clip.split].mkdir(parents=True, exist_ok=True)
        video = dirs[clip.split] / f"{clip.video_id}.mp4"
        sidecar = video.with_suffix(".json")
        fresh = video.is_file() and sidecar.is_file() and sidecar.read_bytes() == _sidecar_bytes(clip, spec)
        if not fresh:
            sidecar.unlink(missing_ok=True)  # a sidecar only ever sits next to its finished video
            todo.append((clip, video))
    _remove_strays(dirs, {c.video_id for c in plan.clips})
    batches = [todo[i:i + spec.clips_per_process] for i in range(0, len(todo), spec.clips_per_process)]
    with ThreadPoolExecutor(max_workers=max(1, min(os.cpu_count() or 1, len(batches)))) as pool:
        for batch in pool.map(lambda b: _encode_batch(b, spec) or b, batches):  # one ffmpeg per core
            for clip, video in batch:
                atomic_write_bytes(video.with_suffix(".json"), _sidecar_bytes(clip, spec))
    return SampleSet(root=root, train_dir=dirs["train"], heldout_dir=dirs["heldout"],
                     clips=plan.clips, unseen=plan.unseen)


def _remove_strays(dirs: dict[str, Path], keep: set[str]) -> None:
    """A rerun with smaller counts must not leave old clips behind to be extracted."""
    for d in dirs.values():
        for p in list(d.glob("*.mp4")) + list(d.glob("*.json")) + list(d.glob(".tmp-*")):
            if p.stem not in keep or p.name.startswith(".tmp-"):
                p.unlink()


def chance_levels(spec: SampleSpec = SampleSpec()) -> dict[str, float]:
    """Accuracy of uniform guessing per attribute and for the whole description."""
    levels = {"colour": 1 / len(spec.colours), "shape": 1 / len(spec.shapes),
              "direction": 1 / len(spec.directions)}
    levels["exact"] = 1 / spec.num_combos
    return levels


def parse_description(text: str, spec: SampleSpec = SampleSpec()) -> dict[str, str | None]:
    """Attributes named in a generated caption (None where none or several are named)."""
    words = text.lower().replace(",", " ").replace(".", " ").split()
    found = {}
    for attr, values in zip(ATTRIBUTES, (spec.colours, spec.shapes, spec.directions)):
        hits = [v for v in values if v in words]
        found[attr] = hits[0] if len(hits) == 1 else None
    return found


def parse_description_fr(text: str, spec: SampleSpec = SampleSpec()) -> dict[str, str | None]:
    """Attributes named in a French caption (`description_fr` style), as English values."""
    words = text.lower().replace(",", " ").replace(".", " ").split()
    found = {}
    for attr, table, values in (("colour", _FR_COLOUR, spec.colours), ("shape", _FR_SHAPE, spec.shapes),
                                ("direction", _FR_DIRECTION, spec.directions)):
        # the direction's last word (gauche, droite, haut, bas) names it
        hits = [v for v in values if table[v].split()[-1] in words]
        found[attr] = hits[0] if len(hits) == 1 else None
    return found


def spec_dict(spec: SampleSpec) -> dict:
    return asdict(spec)
