"""vtt-eval (trainer/tools/gen_eval.py): every assistant turn answered with its history from the data, captions for
caption samples, bounded batches, predictions.jsonl + metrics.json (exact match, sacrebleu BLEU/chrF, groups)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vtt.trainer.models.registry import get_adapter
from vtt.trainer.models.model_config import ModelConfig
from vtt.trainer.tools.gen_eval import EvalConfig, evaluate_model, normalise, scores
from vtt.trainer.models.presets import build_tiny

sys.path.insert(0, str(Path(__file__).parent))
from test_text import _shards_with  # noqa: E402
from train_helpers import PY, REPO, train_env, vtt_train  # noqa: E402

CONV = [{"from": "human", "value": "<video>\nWhat colour?"}, {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "Which way?"}, {"from": "gpt", "value": "left", "loss": False}]


def test_scores_normalise_and_use_sacrebleu():
    assert normalise("  A  Red\nCircle ") == "a red circle"
    m = scores(["a red circle moving to the left", "Blue  square", "a green ball falling down slowly"],
               ["A red circle moving to the left", "blue square", "a yellow ball falling down fast"])
    assert m["n"] == 3 and m["exact_match"] == pytest.approx(2 / 3)
    assert 0 < m["bleu"] < 100 and 0 < m["chrf"] < 100
    assert scores(["the same five words here"], ["the same five words here"])["bleu"] == pytest.approx(100)
    assert scores([], [])["n"] == 0


def test_every_turn_answered_in_bounded_batches(tmp_path):
    path = build_tiny("llava", tmp_path / "llava")
    shards = _shards_with(tmp_path / "shards", ["caption zero", "caption one", "caption two"],
                          extra=[{"conversations": CONV, "split": "a"}, {"split": "b"}, {"conversations": CONV,
                                                                                          "split": "a"}])
    ad = get_adapter(ModelConfig(kind="llava", model_path=str(path)))
    net = ad.load_model()
    sizes, real = [], ad.generate_items
    ad.generate_items = lambda model, pairs, n: sizes.append(len(pairs)) or real(model, pairs, n)
    m = evaluate_model(ad, net, EvalConfig(str(path), str(shards), str(tmp_path / "out"), batch_size=2,
                                           group_by=("split",), max_new_tokens=4))
    rows = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [(r["key"], r["turn"], r["reference"]) for r in rows] == [
        ("clip-0000", 1, "Red."), ("clip-0000", 3, "left"), ("clip-0001", 0, "caption one"),
        ("clip-0002", 1, "Red."), ("clip-0002", 3, "left")]
    assert rows[1]["question"] == "Which way?" and all(isinstance(r["prediction"], str) for r in rows)
    assert sizes == [2, 2, 1]  # never more than --batch-size answers in one generate call
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(m)) and m["n"] == 5
    assert m["by_split"]["a"]["n"] == 4 and m["by_split"]["b"]["n"] == 1


def test_cli_on_an_exported_run(tmp_path, monkeypatch):
    shards = _shards_with(tmp_path / "shards", [f"clip {i}" for i in range(4)])
    run = tmp_path / "run"
    vtt_train("--model", "seq2seq", "--preset", "tiny", "--shards", shards, "--output-dir", run,
              "--micro-batch", 2, "--max-steps", 1, "--set", "run.save_final=false")
    p = subprocess.run([PY, "-m", "vtt.trainer.tools.gen_eval", str(run), "--shards", str(shards), "--out",
                        str(tmp_path / "eval"), "--batch-size", "3"], cwd=REPO, env=train_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "vtt-eval: 4 answers" in p.stdout
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n"] == 4
    # vtt-caption batches the same way: never more than --batch-size inputs per generate call
    from vtt.trainer.models.seq2seq import Seq2SeqAdapter
    from vtt.trainer.tools.caption import caption
    sizes, real = [], Seq2SeqAdapter.generate
    monkeypatch.setattr(Seq2SeqAdapter, "generate", lambda self, m, batch, **kw: sizes.append(len(batch))
                        or real(self, m, batch, **kw))
    got = caption(str(run), [str(shards)], limit=4, batch_size=3, device="cpu")
    assert [k for k, _ in got] == [f"clip-{i:04d}" for i in range(4)] and sizes == [3, 1]
