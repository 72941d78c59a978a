"""vtt-train --eval-generate / --keep-best: answers scored at every eval (metrics.jsonl + RUN/eval/step_N/), and
the best checkpoint by the chosen metric kept beside the last --keep-last, named by checkpoints/best.json."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import make_train_shards, metrics, vtt_train  # noqa: E402

from vtt.trainer.run.checkpoint import incomplete_reason  # noqa: E402


def test_generation_metrics_logged_and_best_checkpoint_kept(tmp_path):
    train = make_train_shards(tmp_path / "train", n=16, per_shard=4)
    evals = make_train_shards(tmp_path / "eval", n=4, per_shard=4, start=100)
    run = tmp_path / "run"
    vtt_train("--model", "seq2seq", "--preset", "tiny", "--shards", train, "--eval-shards", evals, "--output-dir", run,
              "--micro-batch", 4, "--max-steps", 6, "--eval-every", 2, "--save-every", 0, "--keep-last", 1,
              "--lr", 3e-3, "--warmup-steps", 1, "--eval-generate", "--keep-best", "exact_match", "--no-export",
              "--set", "run.eval_generate_samples=3")
    _, evals_lines = metrics(run)
    losses = {x["step"]: x["eval_loss"] for x in evals_lines}
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    gen = [x for x in lines if "eval_exact_match" in x]
    assert sorted(losses) == [2, 4, 6] and [x["step"] for x in gen] == [2, 4, 6]
    assert all(x["eval_n"] == 3 and 0 <= x["eval_exact_match"] <= 1 and x["eval_chrf"] >= 0 for x in gen)
    rows = (run / "eval" / "step_00000004" / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == 3 and json.loads(rows[0])["reference"].startswith("a ")
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    top = max(x["eval_exact_match"] for x in gen)
    want = next(x["step"] for x in gen if x["eval_exact_match"] == top)  # the first to reach it (strictly better)
    assert best["step"] == want and best["metric"] == "exact_match" and best["value"] == top
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert best["tag"] in kept and "step_00000006" in kept and len(kept) <= 2
    assert incomplete_reason(run / "checkpoints" / best["tag"]) is None
