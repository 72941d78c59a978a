"""scripts/demo.py end to end: sample clips -> vtt-prep -> vtt-train (tiny LLaVA and seq2seq) -> held-out
captions far above chance. A smaller set and fewer steps than `make demo`, same code path."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from vtt.pipeline.sample_data import QUESTIONS, SampleSpec, plan_clips

ROOT = Path(__file__).resolve().parents[1]


def _load_demo():
    spec = importlib.util.spec_from_file_location("vtt_demo", ROOT / "scripts" / "demo.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


demo = _load_demo()

# The QA model needs the demo's 384 training clips: with 256 the four-layer preset fits the training clips
# before it generalises shape (seed 0, 2026-12-04: 100%, 62%, 50% at 1000 steps; 100%, 50-66%, 84-88% at 2000).
# The demo's 384 clips at 1000 steps, 64 held out, lr 1e-3 (configs/demo_qa.yaml): seeds 0/1/2 100%/100%/97%,
# 100%/100%/97%, 100%/97%/89% (at 2e-3 seed 2 read direction 36%: README, demo section).
QA_STEPS = 1000
QA_MIN = {"colour": 0.9, "shape": 0.8, "direction": 0.8}
# The test's configuration: fixed seed, fewer held-out clips and caption steps than the demo (configs/demo_*.yaml).
TEST_CFG = dict(n_train=384, n_heldout=32, seed=0, llava_steps=500, seq2seq_steps=300, qa_steps=QA_STEPS)


def test_score_counts_attributes_and_subsets():
    held = plan_clips(8, 4, seed=0, spec=SampleSpec()).split("heldout")
    right = held[0]
    wrong_dir = {"left": "right", "right": "left", "up": "down", "down": "up"}[held[1].direction]
    captions = {right.video_id: right.description,
                held[1].video_id: f"a {held[1].colour} {held[1].shape} moving {wrong_dir}",
                held[2].video_id: "", held[3].video_id: held[3].description.upper()}
    res = demo.score("llava", held, captions)
    acc = res["accuracy"]["all"]
    assert acc == {"exact": 0.5, "colour": 0.75, "shape": 0.75, "direction": 0.5, "n": 4}
    assert set(res["accuracy"]) == {"all", "seen_combo", "unseen_combo"}
    colour_right = {}
    for clip, ok in zip(held, (True, True, False, True)):  # held[2]'s empty caption names no colour
        cell = colour_right.setdefault(clip.colour, [0, 0])
        cell[0] += ok
        cell[1] += 1
    assert res["by_value"]["colour"] == colour_right
    fr = demo.score("seq2seq", held[:1], {right.video_id: right.description_fr})
    assert fr["accuracy"]["all"]["exact"] == 1.0
    with pytest.raises(demo.StageError, match="no llava caption"):
        demo.score("llava", held, {})


def test_score_qa_per_question_type():
    held = plan_clips(8, 4, seed=0, spec=SampleSpec()).split("heldout")
    kind_of = {q: a for a, q in QUESTIONS.items()}
    answers, asked = [], []
    for i, clip in enumerate(held):  # each clip's own question order, as vtt-eval writes the rows
        conv = clip.conversation()
        asked.append([kind_of[t["value"].replace("<video>", "").strip()] for t in conv[::2]])
        for turn in range(1, len(conv), 2):
            attr = asked[-1][turn // 2]
            answers.append({"key": clip.video_id, "turn": turn, "question": conv[turn - 1]["value"],
                            "prediction": getattr(clip, attr) if (i + len(attr)) % 2 else "nonsense"})
    res = demo.score_qa(held, answers[::-1])  # row order does not matter, the turn index does
    acc = res["accuracy"]["all"]
    want = {a: sum((i + len(a)) % 2 for i in range(4)) / 4 for a in ("colour", "shape", "direction")}
    assert {a: acc[a] for a in want} == want and acc["n"] == 4
    # per attribute, right/asked by the position it was asked in
    for a in want:
        expect = [[sum((i + len(a)) % 2 for i in range(4) if asked[i][k] == a),
                   sum(asked[i][k] == a for i in range(4))] for k in range(3)]
        assert res["by_position"][a] == expect, (a, res["by_position"][a])
    assert len({tuple(x) for x in asked}) > 1  # the orders differ, so the positions are really told apart
    # per attribute and true value (each colour word): right/clips
    for a in want:
        expect = {}
        for i, clip in enumerate(held):
            cell = expect.setdefault(getattr(clip, a), [0, 0])
            cell[0] += (i + len(a)) % 2
            cell[1] += 1
        assert res["by_value"][a] == expect, (a, res["by_value"][a])
    with pytest.raises(demo.StageError, match="no qa answers"):
        demo.score_qa(held, answers[:-1])


def test_heldout_picture_shows_each_models_mistakes_and_right_ones():
    def rows(wrong: set[str]):
        return {"rows": [{"key": k, "caption": f"cap {k}", "exact": k not in wrong, "unseen_combo": k in "cf"}
                         for k in "abcdefg"]}
    lines = demo.heldout_lines({"llava": rows({"d"}), "seq2seq": rows(set()), "qa": rows({"a", "b", "d", "g"})},
                               n=5)
    # 2 (n // 2) clips with mistakes, llava's and qa's in turn; then all-right ones, unseen combination first
    assert list(lines) == ["d", "a", "c", "f", "e"]
    assert lines["d"] == "llava: cap d  [WRONG]\nseq2seq: cap d  [right]\nqa: cap d  [WRONG]"
    assert lines["c"].splitlines()[0] == "(this colour+shape+direction never in training)"
    assert list(demo.heldout_lines({"llava": rows(set())}, n=3)) == ["c", "f", "a"]


def test_config_errors_are_named(tmp_path):
    with pytest.raises(ValueError, match="kinds"):
        demo.DemoConfig(out=tmp_path, kinds=("gpt",))
    with pytest.raises(ValueError, match="config .* does not exist"):
        demo.DemoConfig(out=tmp_path, llava_config=tmp_path / "nope.yaml")


def test_demo_learns_from_frames_and_metadata(tmp_path):
    report = demo.run_demo(demo.DemoConfig(out=tmp_path / "demo", **TEST_CFG))
    chance = report["chance"]
    llava = report["results"]["llava"]["accuracy"]
    s2s = report["results"]["seq2seq"]["accuracy"]
    print(json.dumps({"llava": llava, "seq2seq": s2s, "qa": report["results"]["qa"]["accuracy"],
                      "stages": report["stages"]}, indent=1))
    # LLaVA: appearance (colour, shape) and time (direction) read from held-out clips' frames
    assert llava["all"]["colour"] >= 0.9 > 2 * chance["colour"]
    assert llava["all"]["shape"] >= 2 * chance["shape"]
    assert llava["all"]["direction"] >= 2 * chance["direction"]
    assert llava["all"]["exact"] >= 10 * chance["exact"]
    # seq2seq: the French target of metadata rows never seen in training
    assert s2s["unseen_combo"]["exact"] >= 0.5
    assert s2s["all"]["exact"] >= 0.7
    # question answering: each answer depends on its question (asked in a per-clip order), far above chance
    qa = report["results"]["qa"]["accuracy"]["all"]
    for attr in ("colour", "shape", "direction"):
        assert qa[attr] >= QA_MIN[attr] > 1.5 * chance[attr], (attr, qa)
    for name in ("loss_llava", "loss_seq2seq", "loss_qa", "contact_train", "contact_heldout"):
        assert Path(report["paths"][name]).stat().st_size > 5000, name
    assert "chance" in (tmp_path / "demo" / "report.md").read_text()


@pytest.mark.slow
def test_demo_qwen_learns_appearance_and_motion(tmp_path):
    """The tiny Qwen2.5-VL preset captions held-out clips: colour, shape and the direction of motion (seed 0
    measured 100%, 98%, 92%; direction was 28% before the tiny RoPE base, see trainer/models/presets_qwen.py)."""
    report = demo.run_demo(demo.DemoConfig(out=tmp_path / "demo", kinds=("qwen",)))
    chance, qwen = report["chance"], report["results"]["qwen"]["accuracy"]
    print(json.dumps(qwen, indent=1))
    assert qwen["all"]["colour"] >= 0.9
    assert qwen["all"]["direction"] >= 0.6 > 2 * chance["direction"]
    assert qwen["unseen_combo"]["exact"] >= 0.5 > 10 * chance["exact"]
