"""Samples go into shards in a deterministic pseudo-random order (a hash of the key), so a shard mixes
the folders (classes) of a folder-sorted corpus instead of holding one class each."""
from collections import Counter

from prep_helpers import add_video, cfg, live_shards, state_files

from vtt.pipeline.discover import discover
from vtt.pipeline.run import run_extract, sample_order
from vtt.shards.ledger import read_ledger

CLASSES = ("cat", "dog", "eel")


def class_mix(groups: list[list[str]]) -> list[dict]:
    return [dict(Counter(source.split("/")[0] for source in g)) for g in groups]


def test_shards_mix_classes_of_a_folder_sorted_corpus(tmp_path):
    data = tmp_path / "data"
    for c in CLASSES:
        (data / c).mkdir(parents=True)
        for i in range(4):
            add_video(data, f"{c}/{c}{i}.mp4", seconds=0.5)
    out = tmp_path / "out"
    run_extract(cfg(data, out, shard_max_samples=4, num_frames=2))
    ledger = read_ledger(out)
    after = [sorted(r.source for r in ledger.ok_records() if r.shard == u) for u in live_shards(out)]
    sources = sorted(r.source for r in ledger.ok_records())
    before = [sources[i:i + 4] for i in range(0, 12, 4)]  # the old rule: shards follow sorted paths
    print("class mix per shard, sorted paths:", class_mix(before))
    print("class mix per shard, key-hash order:", class_mix(after))
    assert all(len(m) == 1 for m in class_mix(before))
    assert sum(len(m) > 1 for m in class_mix(after)) >= 2  # most shards now hold several classes
    # written in sample order, whatever the pool did; the same inputs give the same bytes
    order = [v.source for v in sample_order(discover(data, False))]
    assert [s for shard in after for s in sorted(shard, key=order.index)] == order
    run_extract(cfg(data, tmp_path / "again", shard_max_samples=4, num_frames=2, workers=2))
    assert state_files(out) == state_files(tmp_path / "again")
