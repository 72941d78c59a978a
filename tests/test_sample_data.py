"""pipeline/sample_data.py: the clips ffmpeg draws show what their sidecars say."""
import json
import subprocess

import numpy as np
import pytest

from vtt.pipeline import sample_data as sd
from vtt.pipeline.sample_data import SampleSpec, make_sample_data, plan_clips

SPEC = SampleSpec()


def _decode(path, size=64):
    out = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         capture_output=True, check=True).stdout
    return np.frombuffer(out, np.uint8).reshape(-1, size, size, 3).astype(int)


def _mask(frame, colour):
    rgb = np.array([int(sd.COLOURS[colour][i:i + 2], 16) for i in (2, 4, 6)])
    return np.abs(frame - rgb).sum(-1) < 90


def _shape(mask) -> str:
    """square: all bbox corners filled; triangle (apex up): bottom ones only; circle: none."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    k = max(2, box.shape[0] // 6)
    top = (box[:k, :k].mean() + box[:k, -k:].mean()) / 2
    bottom = (box[-k:, :k].mean() + box[-k:, -k:].mean()) / 2
    return {(True, True): "square", (False, True): "triangle", (False, False): "circle"}.get(
        (top > 0.5, bottom > 0.5), "?")


def _measured(frames, colour):
    """(direction, shape) read back from the pixels: centroid motion and corner occupancy."""
    steps, shapes = [], []
    prev = None
    masks = [_mask(f, colour) for f in frames]
    full = max(m.sum() for m in masks)  # the object is wholly in view in most frames
    for m in masks:
        ys, xs = np.nonzero(m)
        if len(xs) < 20:
            prev = None
            continue
        c = np.array([xs.mean(), ys.mean()])
        if prev is not None:
            steps.append(c - prev)
        prev = c
        if len(xs) >= 0.9 * full:
            shapes.append(_shape(m))
    dx, dy = np.median(np.array(steps), axis=0)
    direction = (("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up"))
    return direction, max(set(shapes), key=shapes.count)


@pytest.fixture(scope="module", params=["cross", "wrap"])
def sample_set(tmp_path_factory, request):
    return make_sample_data(tmp_path_factory.mktemp("sample"), n_train=12, n_heldout=6, seed=3,
                            spec=SampleSpec(motion=request.param))


def test_layout_and_sidecars(sample_set):
    train = sorted(sample_set.train_dir.glob("*.mp4"))
    held = sorted(sample_set.heldout_dir.glob("*.mp4"))
    assert len(train) == 12 and len(held) == 6
    meta = json.loads(train[0].with_suffix(".json").read_text())
    assert meta["video_id"] == train[0].stem and meta["split"] == "train"
    assert meta["description"] == f"a {meta['colour']} {meta['shape']} moving {meta['direction']}"
    assert meta["description_fr"].startswith("un ") and "se déplace vers" in meta["description_fr"]
    probe = json.loads(subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "stream=width,height,nb_frames,codec_name", "-of", "json",
         str(train[0])], capture_output=True, check=True).stdout)["streams"][0]
    assert (probe["width"], probe["height"], int(probe["nb_frames"])) == (64, 64, 20)


def test_pixels_match_the_description(sample_set):
    for clip in sample_set.clips:
        path = (sample_set.train_dir if clip.split == "train" else sample_set.heldout_dir) / f"{clip.video_id}.mp4"
        assert _measured(_decode(path), clip.colour) == (clip.direction, clip.shape), clip


def test_heldout_combos_never_in_training_and_every_value_trained():
    plan = plan_clips(96, 32, seed=0, spec=SPEC)
    train = {(c.colour, c.shape, c.direction) for c in plan.split("train")}
    held = plan.split("heldout")
    unseen = [c for c in held if c.unseen_combo]
    assert len(unseen) == 16 and len(plan.unseen) == SPEC.unseen_combos
    assert all((c.colour, c.shape, c.direction) not in train for c in unseen)
    assert all((c.colour, c.shape, c.direction) in train for c in held if not c.unseen_combo)
    for i, values in enumerate((SPEC.colours, SPEC.shapes, SPEC.directions)):
        assert {t[i] for t in train} == set(values)
    # held-out clips are new clips even where the combination is not
    looks = {sd._look(c) for c in plan.split("train")}
    assert not any(sd._look(c) in looks for c in held)


def test_plan_is_deterministic_and_balanced():
    a, b = plan_clips(84, 8, seed=5, spec=SPEC), plan_clips(84, 8, seed=5, spec=SPEC)
    assert a.clips == b.clips and plan_clips(84, 8, seed=6, spec=SPEC).clips != a.clips
    counts = {}
    for c in a.split("train"):
        counts[(c.colour, c.shape, c.direction)] = counts.get((c.colour, c.shape, c.direction), 0) + 1
    assert set(counts.values()) == {2}  # 84 clips over 42 seen combos, cycled


def test_rerun_keeps_matching_clips_and_drops_strays(tmp_path):
    s1 = make_sample_data(tmp_path, n_train=3, n_heldout=1, seed=1)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.mp4")}
    make_sample_data(tmp_path, n_train=2, n_heldout=1, seed=1)
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.mp4")}
    assert set(after) == set(before) - {s1.train_dir / "train_0002.mp4"}
    assert all(after[p] == before[p] for p in after)
    assert not (s1.train_dir / "train_0002.json").exists()


def test_chance_and_parse():
    assert sd.chance_levels(SPEC) == {"colour": 0.25, "shape": 1 / 3, "direction": 0.25, "exact": 1 / 48}
    assert sd.parse_description("a blue triangle moving up.") == {"colour": "blue", "shape": "triangle",
                                                                 "direction": "up"}
    assert sd.parse_description("a red green thing") == {"colour": None, "shape": None, "direction": None}


@pytest.mark.parametrize("kwargs, match", [
    ({"object_size": (2, 4)}, "object_size"),
    ({"colours": ("red", "mauve")}, "mauve"),
    ({"unseen_combos": 48}, "unseen_combos"),
])
def test_bad_spec_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SampleSpec(**kwargs)


def test_missing_ffmpeg_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="ffmpeg not found"):
        make_sample_data(tmp_path, 1, 0, spec=SampleSpec(ffmpeg="no-such-ffmpeg-here"))


def test_ring_and_cross_render_as_named(tmp_path):
    """The optional shapes: a ring is hollow, a cross has empty corners and a filled centre."""
    spec = SampleSpec(shapes=("ring", "cross"), colours=("red",), directions=("right",), unseen_combos=0)
    made = make_sample_data(tmp_path, n_train=2, n_heldout=0, seed=0, spec=spec)
    for clip in made.clips:
        frame = _decode(made.train_dir / f"{clip.video_id}.mp4")[0]
        m = _mask(frame, "red")
        ys, xs = np.nonzero(m)
        box = m[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        h, w = box.shape
        centre = box[h // 2 - 1:h // 2 + 2, w // 2 - 1:w // 2 + 2].mean()
        corners = np.mean([box[:3, :3].mean(), box[:3, -3:].mean(), box[-3:, :3].mean(), box[-3:, -3:].mean()])
        assert (centre, corners) == ((0.0, 0.0) if clip.shape == "ring" else (1.0, 0.0)), clip
        assert sd.parse_description_fr(clip.description_fr, spec)["shape"] == clip.shape
