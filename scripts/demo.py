"""`make demo`: the whole job on built-in sample data, on CPU, in minutes.

sample clips (ffmpeg lavfi) -> `vtt-prep extract` -> `vtt-train --preset tiny` (LLaVA and seq2seq)
-> captions of held-out clips -> held-out accuracy against chance, loss curves, contact sheets.
Every stage runs the real command a user would run (printed as it starts); training runs in its own
process because DeepSpeed keeps process groups per process. Reruns reuse the clips and the shards.
"""
from __future__ import annotations

import itertools
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("llava", "seq2seq", "qa")  # what `make demo` runs
ALL_KINDS = KINDS + ("qwen", "qa_qwen")  # qwen: the tiny Qwen2.5-VL preset captioning; qa_qwen: answering
QA_KINDS = ("qa", "qa_qwen")
MODEL_OF = {"llava": "llava", "seq2seq": "seq2seq", "qa": "llava",  # qa: the LLaVA preset on the conversations
            "qwen": "qwen_vl", "qa_qwen": "qwen_vl"}
ATTRS = ("colour", "shape", "direction")
# Environment for the child processes, as the Makefile sets it (tiny ops: one thread is fastest).
CHILD_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
             "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("demo-out")
    n_train: int = 384
    n_heldout: int = 64
    seed: int = 0
    frame_size: int = 64           # pixels; the tiny model resizes to its own 32 anyway
    num_frames: int = 4            # enough to see the direction; fewer video tokens learn faster
    kinds: tuple[str, ...] = KINDS
    llava_config: Path = ROOT / "configs" / "demo_llava.yaml"
    seq2seq_config: Path = ROOT / "configs" / "demo_seq2seq.yaml"
    qa_config: Path = ROOT / "configs" / "demo_qa.yaml"
    qwen_config: Path = ROOT / "configs" / "demo_qwen.yaml"
    qa_qwen_config: Path = ROOT / "configs" / "demo_qa_qwen.yaml"
    llava_steps: int | None = None     # None: as in the YAML
    seq2seq_steps: int | None = None
    qa_steps: int | None = None
    qwen_steps: int | None = None
    qa_qwen_steps: int | None = None
    workers: int | None = None         # vtt-prep worker processes (None: all cores)
    wandb_project: str | None = None
    wandb_mode: str | None = None
    train_args: tuple[str, ...] = ()   # extra vtt-train flags for both models

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out))
        if self.n_train < 8 or self.n_heldout < 2:
            raise ValueError(f"n_train must be >= 8 and n_heldout >= 2, got {self.n_train}, {self.n_heldout}")
        if not self.kinds or set(self.kinds) - set(ALL_KINDS):
            raise ValueError(f"kinds must be a non-empty subset of {ALL_KINDS}, got {self.kinds}")
        for kind in self.kinds:
            path = self.config_for(kind)
            if not Path(path).is_file():
                raise ValueError(f"{kind} config {path} does not exist")
        for name in ("llava_steps", "seq2seq_steps", "qa_steps", "qwen_steps", "qa_qwen_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")

    def config_for(self, kind: str) -> Path:
        return Path(getattr(self, f"{kind}_config"))

    def steps_for(self, kind: str) -> int | None:
        return getattr(self, f"{kind}_steps")


@dataclass
class Layout:
    """Where everything goes under cfg.out."""
    out: Path
    videos: Path = field(init=False)
    shards: Path = field(init=False)
    runs: Path = field(init=False)
    pictures: Path = field(init=False)
    logs: Path = field(init=False)

    def __post_init__(self):
        self.videos, self.shards, self.runs = self.out / "videos", self.out / "shards", self.out / "runs"
        self.pictures, self.logs = self.out / "pictures", self.out / "logs"

    def shards_of(self, split: str) -> Path:
        return self.shards / split

    def run_of(self, kind: str) -> Path:
        return self.runs / kind


class StageError(RuntimeError):
    """A demo stage failed; the message names the stage, the command and its log."""


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.stages: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        t = time.perf_counter()
        click.secho(f"\n== {name}", bold=True, err=True)
        yield
        self.stages[name] = round(time.perf_counter() - t, 1)
        click.echo(f"   {name}: {self.stages[name]:.1f} s", err=True)

    @property
    def total(self) -> float:
        return round(time.perf_counter() - self.t0, 1)


def run_logged(cmd: list[str], log_path: Path, what: str) -> None:
    """Run cmd, copying its output to the terminal and to log_path as it comes (progress bars too)."""
    click.echo("   $ " + shlex.join(str(c) for c in cmd), err=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **{k: os.environ.get(k, v) for k, v in CHILD_ENV.items()}}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        while chunk := os.read(proc.stdout.fileno(), 65536):
            log.write(chunk)
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
        code = proc.wait()
    if code != 0:
        tail = log_path.read_text(errors="replace")[-1500:]
        raise StageError(f"{what} failed (exit {code}); full log: {log_path}\n{tail}")


# ------------------------------------------------------------------ stages

def make_clips(cfg: DemoConfig, lay: Layout):
    from vtt.pipeline.sample_data import make_sample_data
    sample_set = make_sample_data(lay.videos, n_train=cfg.n_train, n_heldout=cfg.n_heldout, seed=cfg.seed)
    unseen = ", ".join(" ".join(c) for c in sample_set.unseen)
    click.echo(f"   {cfg.n_train} training + {cfg.n_heldout} held-out clips in {lay.videos} "
               f"(combinations only in held-out: {unseen})", err=True)
    return sample_set


def extract(cfg: DemoConfig, lay: Layout) -> None:
    for split in ("train", "heldout"):
        cmd = [sys.executable, "-m", "vtt.pipeline.cli", "extract", str(lay.videos / split),
               str(lay.shards_of(split)), "--size", str(cfg.frame_size), "--num-frames", str(cfg.num_frames),
               "--quiet"]
        if cfg.workers:
            cmd += ["--workers", str(cfg.workers)]
        run_logged(cmd, lay.logs / f"extract-{split}.log", f"vtt-prep extract ({split})")


def train(cfg: DemoConfig, lay: Layout, kind: str) -> Path:
    run_dir = lay.run_of(kind)
    if run_dir.exists():  # the demo's own folder: a rerun trains from scratch, never resumes
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "vtt.trainer.cli", "--config", str(cfg.config_for(kind)), "--model", MODEL_OF[kind],
           "--preset", "tiny", "--shards", str(lay.shards_of("train")), "--eval-shards",
           str(lay.shards_of("heldout")), "--output-dir", str(run_dir), "--seed", str(cfg.seed),
           "--data-seed", str(cfg.seed)]
    if cfg.steps_for(kind):
        cmd += ["--max-steps", str(cfg.steps_for(kind))]
    if cfg.wandb_project:
        cmd += ["--wandb-project", cfg.wandb_project] + (["--wandb-mode", cfg.wandb_mode] if cfg.wandb_mode else [])
    run_logged(cmd + list(cfg.train_args), lay.logs / f"train-{kind}.log", f"vtt-train ({kind})")
    return run_dir / "final"


def caption_heldout(model_dir: Path, lay: Layout, n: int) -> dict[str, str]:
    """key -> caption for every held-out shard sample, with the exported model (vtt-caption's code)."""
    from vtt.trainer.tools.caption import caption
    return dict(caption(str(model_dir), [str(lay.shards_of("heldout"))], limit=n, max_new_tokens=24,
                        device="cpu"))


def answer_heldout(model_dir: Path, lay: Layout, kind: str = "qa") -> list[dict]:
    """vtt-eval's rows (key, turn, question, reference, prediction) for every question of every held-out clip."""
    from vtt.trainer.tools.gen_eval import PREDICTIONS_FILE, EvalConfig, run_eval
    out = lay.out / f"{kind.replace('_', '-')}-eval"
    run_eval(EvalConfig(str(model_dir), str(lay.shards_of("heldout")), str(out), batch_size=16, max_new_tokens=4,
                        device="cpu"))
    return [json.loads(x) for x in (out / PREDICTIONS_FILE).read_text().splitlines()]


# ------------------------------------------------------------------ scoring

def score_qa(clips, answers: list[dict]) -> dict:
    """Per question type: is the answer the clip's attribute? exact = all three questions of a clip right."""
    from vtt.pipeline.sample_data import QUESTIONS
    from vtt.shards.format import make_key
    kind_of = {q: a for a, q in QUESTIONS.items()}
    by_key: dict = {}
    turns: dict = {}  # key -> attribute -> its turn index in the conversation
    for r in answers:
        attr = kind_of[r["question"].replace("<video>", "").strip()]
        by_key.setdefault(r["key"], {})[attr] = r["prediction"].strip().lower()
        turns.setdefault(r["key"], {})[attr] = r["turn"]
    rows = []
    for clip in clips:
        key = make_key(clip.video_id)
        got = by_key.get(key)
        if got is None or set(got) != set(ATTRS):
            raise StageError(f"no qa answers to all questions for held-out clip {key} (answered: {len(by_key)})")
        row = {"key": key, "unseen_combo": clip.unseen_combo,
               "reference": ", ".join(f"{a} {getattr(clip, a)}" for a in ATTRS),
               "caption": ", ".join(f"{a} {got[a]}" for a in ATTRS)}
        row.update({a: got[a] == getattr(clip, a) for a in ATTRS})
        row["exact"] = all(row[a] for a in ATTRS)
        row["asked"] = sorted(ATTRS, key=turns[key].get)
        row["truth"] = {a: getattr(clip, a) for a in ATTRS}
        rows.append(row)
    return {"accuracy": _subsets(rows), "by_position": by_position(rows), "by_value": by_value(rows), "rows": rows}


def by_value(rows: list[dict]) -> dict:
    """Per attribute and per true value (each colour word, shape, direction), [right, clips]: a word the model
    never produces shows here as 0/n while the attribute's accuracy still looks fine (issue 20's "yellow")."""
    out: dict = {a: {} for a in ATTRS}
    for r in rows:
        for a in ATTRS:
            cell = out[a].setdefault(r["truth"][a], [0, 0])
            cell[0] += r[a]
            cell[1] += 1
    return {a: dict(sorted(v.items())) for a, v in out.items()}


def by_position(rows: list[dict]) -> dict:
    """Per attribute, [right, asked] when asked first, second, third: an answer that is worse when asked later
    leans on the earlier answers (README, demo section)."""
    out = {a: [[0, 0] for _ in ATTRS] for a in ATTRS}
    for r in rows:
        for rank, a in enumerate(r["asked"]):
            out[a][rank][0] += r[a]
            out[a][rank][1] += 1
    return out


def _subsets(rows: list[dict]) -> dict:
    subsets = {"all": rows, "seen_combo": [r for r in rows if not r["unseen_combo"]],
               "unseen_combo": [r for r in rows if r["unseen_combo"]]}
    return {name: _accuracy(sub) for name, sub in subsets.items() if sub}


def score(kind: str, clips, captions: dict[str, str]) -> dict:
    """Exact-match and per-attribute accuracy of captions, overall and split by combination novelty."""
    from vtt.pipeline.sample_data import parse_description, parse_description_fr
    from vtt.shards.format import make_key
    english = kind in ("llava", "qwen")
    parse = parse_description if english else parse_description_fr
    rows = []
    for clip in clips:
        key = make_key(clip.video_id)
        if key not in captions:
            raise StageError(f"no {kind} caption for held-out clip {key} (captioned: {len(captions)})")
        text = captions[key]
        want = clip.description if english else clip.description_fr
        got = parse(text)
        row = {"key": key, "unseen_combo": clip.unseen_combo, "caption": text, "reference": want,
               "exact": text.strip().lower() == want.lower()}
        row.update({a: got[a] == getattr(clip, a) for a in ATTRS})
        row["truth"] = {a: getattr(clip, a) for a in ATTRS}
        rows.append(row)
    return {"accuracy": _subsets(rows), "by_value": by_value(rows), "rows": rows}


def _accuracy(rows: list[dict]) -> dict:
    out = {m: round(sum(r[m] for r in rows) / len(rows), 3) for m in ("exact",) + ATTRS}
    out["n"] = len(rows)
    return out


def chance() -> dict:
    from vtt.pipeline.sample_data import chance_levels
    return {k: round(v, 3) for k, v in chance_levels().items()}


# ------------------------------------------------------------------ pictures and report

def pictures(cfg: DemoConfig, lay: Layout, results: dict[str, dict]) -> dict[str, str]:
    from vtt.trainer.tools.plots import contact_sheet, plot_loss
    out = {}
    for kind in cfg.kinds:
        metrics = lay.run_of(kind) / "metrics.jsonl"
        out[f"loss_{kind}"] = str(plot_loss(metrics, lay.pictures / f"loss_{kind}.png",
                                            title=f"tiny {kind}: train and held-out loss"))
    out["contact_train"] = str(contact_sheet(lay.shards_of("train"), lay.pictures / "contact_train.png",
                                             n_samples=6))
    shown = heldout_lines(results, n=8)
    if shown:
        out["contact_heldout"] = str(contact_sheet(lay.shards_of("heldout"), lay.pictures / "contact_heldout.png",
                                                   keys=list(shown), captions=shown))
    return out


def heldout_lines(results: dict[str, dict], n: int) -> dict[str, str]:
    """key -> one line per model ("llava: a red circle moving left  [right]") for n held-out clips: up to half
    of them clips some model got wrong, taken in turn from each model's mistakes (so every model's errors show),
    then clips every model got right, those whose combination never appeared in training first."""
    by_key: dict[str, list[tuple[str, dict]]] = {}
    for kind, res in results.items():
        for r in res["rows"]:
            by_key.setdefault(r["key"], []).append((kind, r))
    mistakes = [[r["key"] for r in res["rows"] if not r["exact"]] for res in results.values()]
    keys: list[str] = []
    for key in (k for round_ in itertools.zip_longest(*mistakes) for k in round_ if k):
        if len(keys) < n // 2 and key not in keys:
            keys.append(key)

    def rank(key: str) -> tuple[bool, bool]:
        rows = [r for _, r in by_key[key]]
        return not all(r["exact"] for r in rows), not rows[0]["unseen_combo"]
    keys += sorted((k for k in by_key if k not in keys), key=rank)[:n - len(keys)]  # stable: held-out order

    def lines(key: str) -> list[str]:
        rows = by_key[key]
        unseen = ["(this colour+shape+direction never in training)"] if rows[0][1]["unseen_combo"] else []
        return unseen + [f"{kind}: {r['caption']}  [{'right' if r['exact'] else 'WRONG'}]" for kind, r in rows]
    return {k: "\n".join(lines(k)) for k in keys}


def write_report(cfg: DemoConfig, lay: Layout, report: dict) -> Path:
    (lay.out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    lines = ["# vtt demo report\n", f"wall time {report['wall_s']:.0f} s; stages: " +
             ", ".join(f"{k} {v:.0f} s" for k, v in report["stages"].items()), ""]
    ch = report["chance"]
    for kind, res in report["results"].items():
        lines += [f"## {kind} (held-out)", "", "| subset | n | exact | colour | shape | direction |",
                  "|---|---|---|---|---|---|"]
        for name, a in res["accuracy"].items():
            lines.append(f"| {name} | {a['n']} | {a['exact']:.0%} | {a['colour']:.0%} | {a['shape']:.0%} | "
                         f"{a['direction']:.0%} |")
        lines.append(f"| chance (uniform guess) | | {ch['exact']:.1%} | {ch['colour']:.0%} | {ch['shape']:.0%} | "
                     f"{ch['direction']:.0%} |")
        if "by_position" in res:
            lines += ["", "asked first / second / third (right/asked): " + "; ".join(
                f"{a} " + " ".join(f"{ok}/{n}" for ok, n in res["by_position"][a]) for a in ATTRS)]
        if "by_value" in res:
            lines += ["", "per true value (right/clips): " + "; ".join(
                ", ".join(f"{v} {ok}/{n}" for v, (ok, n) in res["by_value"][a].items()) for a in ATTRS)]
        lines += ["", "examples (reference -> model):", ""]
        lines += [f"- `{r['key']}`{' (unseen combination)' if r['unseen_combo'] else ''}: {r['reference']} -> "
                  f"{r['caption']}" for r in res["rows"][:6]] + [""]
    path = lay.out / "report.md"
    path.write_text("\n".join(lines))
    return path


def log_to_wandb(cfg: DemoConfig, lay: Layout, pics: dict[str, str], report: dict) -> None:
    """Pictures and held-out accuracy into each model's own W&B run (resumed by the id vtt-train saved)."""
    if not cfg.wandb_project:
        return
    import wandb

    from vtt.trainer.tools.plots import log_image
    for kind in cfg.kinds:
        run_dir = lay.run_of(kind)
        id_file = run_dir / "wandb_run_id"
        if not id_file.is_file():
            continue
        run = wandb.init(project=cfg.wandb_project, id=id_file.read_text().strip(), resume="allow",
                         dir=str(run_dir), mode=cfg.wandb_mode or os.environ.get("WANDB_MODE") or "online")
        try:
            for name, png in pics.items():
                if name == f"loss_{kind}" or (kind == "llava" and name.startswith("contact")):
                    log_image(png, f"demo/{name}")
            run.summary.update({f"heldout/{k}": v for k, v in report["results"][kind]["accuracy"]["all"].items()})
        finally:
            run.finish()


def print_summary(cfg: DemoConfig, lay: Layout, report: dict) -> None:
    ch = report["chance"]
    click.secho(f"\n== done in {report['wall_s']:.0f} s", bold=True)
    for kind, res in report["results"].items():
        for name, a in res["accuracy"].items():
            click.echo(f"   {kind:8s} held-out {name:13s} n={a['n']:3d}  exact {a['exact']:6.1%}  colour "
                       f"{a['colour']:6.1%}  shape {a['shape']:6.1%}  direction {a['direction']:6.1%}")
    click.echo(f"   chance (uniform guess)          exact {ch['exact']:6.1%}  colour {ch['colour']:6.1%}  shape "
               f"{ch['shape']:6.1%}  direction {ch['direction']:6.1%}")
    click.echo("\nwhere everything went:")
    for what, where in report["paths"].items():
        click.echo(f"   {what:18s} {where}")


def run_demo(cfg: DemoConfig) -> dict:
    """All stages; returns the report (also written to OUT/report.json and OUT/report.md)."""
    lay = Layout(cfg.out)
    lay.out.mkdir(parents=True, exist_ok=True)
    timer = Timer()
    with timer.stage("1/5 sample clips (ffmpeg lavfi)"):
        sample_set = make_clips(cfg, lay)
    with timer.stage("2/5 vtt-prep extract"):
        extract(cfg, lay)
    models = {}
    for kind in cfg.kinds:
        with timer.stage(f"3/5 vtt-train --preset tiny --model {kind}"):
            models[kind] = train(cfg, lay, kind)
    captions, results = {}, {}
    with timer.stage("4/5 caption held-out clips + score"):
        held = sample_set.split("heldout")
        for kind in cfg.kinds:
            if kind in QA_KINDS:
                results[kind] = score_qa(held, answer_heldout(models[kind], lay, kind))
                continue
            captions[kind] = caption_heldout(models[kind], lay, len(held))
            results[kind] = score(kind, held, captions[kind])
    with timer.stage("5/5 pictures"):
        pics = pictures(cfg, lay, results)
    paths = {"videos": lay.videos, "shards": lay.shards, **{f"run {k}": lay.run_of(k) for k in cfg.kinds},
             **{f"model {k}": models[k] for k in cfg.kinds}, **pics,
             "report": lay.out / "report.md", "logs": lay.logs}
    report = {"config": asdict(cfg), "wall_s": timer.total, "stages": timer.stages, "chance": chance(),
              "unseen_combos": [list(c) for c in sample_set.unseen], "results": results,
              "paths": {k: str(v) for k, v in paths.items()}}
    write_report(cfg, lay, report)
    log_to_wandb(cfg, lay, pics, report)
    return report


@click.command(help=__doc__.split("\n\n")[0])
@click.option("--out", default="demo-out", show_default=True, type=click.Path(file_okay=False))
@click.option("--n-train", default=DemoConfig.n_train, show_default=True)
@click.option("--n-heldout", default=DemoConfig.n_heldout, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--model", "--models", "kinds", multiple=True, type=click.Choice(ALL_KINDS),
              help="Train only these (repeatable) [default: llava, seq2seq, qa; qwen / qa_qwen: the tiny Qwen2.5-VL "
              "captioning / answering].")
@click.option("--llava-steps", type=int, help="Override the YAML's run.max_steps for LLaVA.")
@click.option("--seq2seq-steps", type=int, help="Override the YAML's run.max_steps for seq2seq.")
@click.option("--qa-steps", type=int, help="Override the YAML's run.max_steps for question answering.")
@click.option("--qwen-steps", type=int, help="Override the YAML's run.max_steps for Qwen-VL.")
@click.option("--qa-qwen-steps", type=int, help="Override the YAML's run.max_steps for Qwen-VL answering.")
@click.option("--workers", type=int, help="vtt-prep worker processes [default: all cores].")
@click.option("--wandb-project", help="Also log runs, pictures and accuracy to this W&B project.")
@click.option("--wandb-mode", type=click.Choice(["online", "offline", "disabled"]))
def main(out, n_train, n_heldout, seed, kinds, llava_steps, seq2seq_steps, qa_steps, qwen_steps, qa_qwen_steps,
         workers, wandb_project, wandb_mode):
    for k, v in CHILD_ENV.items():
        os.environ.setdefault(k, v)
    try:
        cfg = DemoConfig(out=Path(out), n_train=n_train, n_heldout=n_heldout, seed=seed, kinds=kinds or KINDS,
                         llava_steps=llava_steps, seq2seq_steps=seq2seq_steps, qa_steps=qa_steps,
                         qwen_steps=qwen_steps, qa_qwen_steps=qa_qwen_steps, workers=workers,
                         wandb_project=wandb_project, wandb_mode=wandb_mode)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    try:
        report = run_demo(cfg)
    except StageError as e:
        raise click.ClickException(str(e)) from None
    print_summary(cfg, Layout(cfg.out), report)


if __name__ == "__main__":
    main()
