"""The trainer reads a pinned index snapshot: real vtt-prep commits, rewrites and compacts the same folder
meanwhile; resumes continue the saved epoch exactly on its snapshot or refuse naming what changed."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prep_helpers import add_video, cfg, make_corpus
from test_data import keys_of, take, write_shards

from vtt.pipeline.compact import compact_shards
from vtt.pipeline.config import CompactConfig
from vtt.pipeline.run import run_extract
from vtt.shards.index import read_index
from vtt.trainer.data.loader import (DataConfig, DataResumeError, SnapshotError, build_loader, pin_data,
                                     steps_per_epoch, unpin)

N = 8  # videos; 2 a shard -> 4 shards


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("snap")
    data, out = make_corpus(root / "data", n=N), root / "shards"
    run_extract(cfg(data, out, shard_max_samples=2))
    return root


@pytest.fixture()
def prep(template, tmp_path):
    shutil.copytree(template, tmp_path / "c")
    yield tmp_path / "c" / "data", tmp_path / "c" / "shards"
    unpin()


def listed(out):
    return [s.url for s in read_index(out).shards]


def retain(out):
    """What vtt-prep's retention gives the reader: shards retired by a rewrite/compact stay on disk for a
    while. Hard links taken now are put back after the command if it deleted them."""
    keep = out.parent / "retained"
    keep.mkdir(exist_ok=True)
    for p in out.glob("shard-*.tar"):
        if not (keep / p.name).exists():
            os.link(p, keep / p.name)
    return lambda: [os.link(p, out / p.name) for p in keep.iterdir() if not (out / p.name).exists()]


def expire(out):
    """The retention period passed: shards the index no longer lists are deleted."""
    for p in out.glob("shard-*.tar"):
        if p.name not in listed(out):
            p.unlink()


def edit_sidecar(data, name="v03"):
    side = data / f"{name}.json"
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "description": meta["description"] + ", edited"}))


def reshard(kind, data, out):
    if kind == "compact":
        compact_shards(CompactConfig(out))  # 4 shards of 2 -> one of 8
    else:
        edit_sidecar(data)  # the shard holding v03 is rewritten into a new one
        run_extract(cfg(data, out, shard_max_samples=2))


@pytest.mark.parametrize("kind,workers", [("compact", 0), ("rewrite", 2)])
def test_resume_after_resharding_continues_the_epoch_exactly(prep, kind, workers):
    data, out = prep
    dcfg = DataConfig(str(out), shuffle_buffer=3, num_workers=workers, seed=4)
    full = take(build_loader(dcfg, keys_of, 1), 2 * N)  # two epochs, nothing in between
    loader = build_loader(dcfg, keys_of, 1)
    head = take(loader, 3)
    state = json.loads(json.dumps(loader.state()))
    before = listed(out)
    put_back = retain(out)
    reshard(kind, data, out)
    put_back()
    assert listed(out) != before  # re-sharded: other shard names, the same sample count
    resumed = build_loader(dcfg, keys_of, 1, start=state)
    rest = take(resumed, N - 3)
    assert head + rest == full[:N]  # the same samples as without the re-shard, none twice, none left out
    assert sorted(k for b in head + rest for k in b) == sorted(f"v{i:02d}" for i in range(N))
    nxt = take(resumed, N)  # the next epoch reads the current index
    assert resumed.state()["snapshot"]["digest"] == hashlib.sha256((out / "index.json").read_bytes()).hexdigest()
    assert sorted(k for b in nxt for k in b) == sorted(f"v{i:02d}" for i in range(N))


def test_resume_refuses_when_the_saved_shards_are_gone(prep):
    data, out = prep
    dcfg = DataConfig(str(out), shuffle_buffer=3)
    loader = build_loader(dcfg, keys_of, 1)
    take(loader, 3)
    state = loader.state()
    old = set(listed(out))
    reshard("rewrite", data, out)
    expire(out)
    gone = sorted(old - set(listed(out)))
    assert gone
    with pytest.raises(DataResumeError, match="not on disk as they were") as e:
        build_loader(dcfg, keys_of, 1, start=state)
    assert all(g in str(e.value) for g in gone) and "--data-resume next_epoch" in str(e.value)
    nxt = DataConfig(str(out), shuffle_buffer=3, resume="next_epoch")
    resumed = build_loader(nxt, keys_of, 1, start=state)
    assert resumed.state()["epoch"] == 1 and resumed.state()["batch"] == 0
    assert sorted(k for b in take(resumed, N) for k in b) == sorted(f"v{i:02d}" for i in range(N))


def test_pinned_loaders_ignore_prep_commits_and_unlisted_tars(prep):
    data, out = prep
    dcfg = DataConfig(str(out), eval_fraction=0.3, shuffle_buffer=0)
    pin_data(dcfg)
    first = list(build_loader(dcfg, keys_of, 1, split="eval"))
    add_video(data, "late.mp4")
    put_back = retain(out)
    run_extract(cfg(data, out, shard_max_samples=2))  # commits a new shard and index
    edit_sidecar(data)
    run_extract(cfg(data, out, shard_max_samples=2))  # rewrites a shard
    put_back()
    (out / "shard-000099.tar").write_bytes(b"half-written by someone")  # unlisted: none of the reader's business
    again = build_loader(dcfg, keys_of, 1, split="eval")
    assert list(again) == first
    per_epoch = steps_per_epoch(dcfg, 1, 1)
    train = build_loader(dcfg, keys_of, 1)
    assert len(train) == per_epoch and "late" not in {k for b in take(train, per_epoch) for k in b}
    unpin()
    assert "late" in {k for b in take(build_loader(dcfg, keys_of, 1), steps_per_epoch(dcfg, 1, 1)) for k in b}


@pytest.mark.parametrize("workers", [0, 2])
def test_a_pinned_shard_deleted_mid_epoch_is_an_error_naming_it(tmp_path, workers):
    folder = write_shards(tmp_path, [4] * 4)
    dcfg = DataConfig(str(folder), shuffle_buffer=0, interleave_shards=1, num_workers=workers)
    pin_data(dcfg)
    try:
        loader = build_loader(dcfg, keys_of, 1)
        it = iter(loader)
        first = next(it)[0]
        for p in folder.glob("*.tar"):  # open ones stay readable (POSIX); the next one opened is gone
            p.unlink()
        with pytest.raises(SnapshotError, match=r"shard-00000\d\.tar: shard of the pinned index is gone"):
            for _ in range(40):
                next(it)
        assert loader.corrupt == {} and first
        with pytest.raises(SnapshotError, match="no longer on disk"):
            build_loader(dcfg, keys_of, 1)  # an eval/rebuild says so before reading anything
    finally:
        unpin()


AGREE = textwrap.dedent("""
    import sys, time, torch.distributed as dist
    from pathlib import Path
    sys.path.insert(0, sys.argv[4])
    from test_data import write_shards
    from vtt.trainer.data.loader import DataConfig, agree_data, pin_data, steps_per_epoch
    rank, folder, store = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    dcfg = DataConfig(str(folder))
    if rank == 1:  # rank 1 starts after a vtt-prep commit grew the folder
        while not (folder.parent / "rank0-pinned").exists():
            time.sleep(0.05)
        write_shards(folder, [4, 4, 4])
    pin_data(dcfg)
    mine = steps_per_epoch(dcfg, 1, 1)
    if rank == 0:
        (folder.parent / "rank0-pinned").touch()
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
    changed = agree_data(dcfg)
    print("RESULT", rank, mine, changed, steps_per_epoch(dcfg, 1, 1))
    dist.destroy_process_group()
""")


def test_ranks_take_rank_zeros_snapshot(tmp_path):
    folder = write_shards(tmp_path / "s", [4, 4])
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    tests = str(Path(__file__).parent)
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(folder), str(tmp_path / "store"), tests],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    results = sorted(line.split()[1:] for o, _ in outs for line in o.splitlines() if line.startswith("RESULT"))
    assert results == [["0", "8", "False", "8"], ["1", "12", "True", "8"]]


EVAL_WHILE_PREP_COMMITS = textwrap.dedent("""
    import subprocess, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from prep_helpers import add_video, env, prep_cmd
    from vtt.pipeline.faults import ENV
    from vtt.trainer import cli
    from vtt.trainer.run import loop
    data, out = Path(sys.argv[2]), sys.argv[3]
    flags = ["--num-frames", "4", "--size", "96x32", "--resize", "stretch", "--shard-max-samples", "2", "-q"]
    real, calls = loop.eval_and_log, []

    def evaluate_while_prep_commits(*args, **kw):
        calls.append(1)
        add_video(data, f"late{len(calls)}.mp4")
        crash = {ENV: "shard-renamed"} if len(calls) == 1 else {}  # 1st: a new shard on disk, not yet listed
        p = subprocess.run(prep_cmd("extract", str(data), out, *flags), env={**env(), **crash})
        assert p.returncode == (-9 if crash else 0), p.returncode
        return real(*args, **kw)

    loop.eval_and_log = evaluate_while_prep_commits
    sys.argv = ["vtt-train"] + sys.argv[4:]
    cli.main()
""")


def test_training_with_evals_while_vtt_prep_commits_to_the_same_folder(prep, tmp_path):
    from train_helpers import PY, REPO, metrics, train_env
    data, out = prep
    run = tmp_path / "run"
    args = ["--model", "seq2seq", "--preset", "tiny", "--shards", str(out), "--eval-fraction", "0.25",
            "--eval-every", "1", "--max-steps", "3", "--micro-batch", "1", "--output-dir", str(run), "--no-export",
            "--save-every", "0", "--log-every", "1"]
    p = subprocess.run([PY, "-c", EVAL_WHILE_PREP_COMMITS, str(Path(__file__).parent), str(data), str(out), *args],
                       cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [x["step"] for x in metrics(run)[1]] == [1, 2, 3]  # every eval ran on the pinned index
    assert len(listed(out)) == N // 2 + 2  # vtt-prep did commit meanwhile: late1+late2, then late3
