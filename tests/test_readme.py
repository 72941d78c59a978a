"""README.md's command lines use only options that exist: every vtt-prep/vtt-train/vtt-caption/vtt-eval line in
its code blocks (and inline code that starts with one) is parsed and each `--option` looked up in that click
command (the subcommand for vtt-prep)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
CLIS = ("vtt-prep", "vtt-train", "vtt-caption", "vtt-eval")


def commands() -> list[tuple[int, list[str]]]:
    """(line number, argv) of every CLI command in README.md's fenced code blocks; continuation lines joined,
    comments dropped, `;`/`&&`/`|` separate commands, leading VAR=value assignments skipped."""
    out, in_block, pending, start = [], False, "", 0
    for n, line in enumerate(README.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_block, pending = not in_block, ""
            continue
        if not in_block:
            continue
        if not pending:
            start = n
        pending += line
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        text, pending = pending, ""
        for part in re.split(r"\s(?:;|&&|\|\|?)\s", text):
            try:
                argv = shlex.split(part, comments=True)
            except ValueError:
                continue
            while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", argv[0]):
                argv = argv[1:]
            if argv and argv[0] in CLIS:
                out.append((start, argv))
    return out + inline_commands()


def inline_commands() -> list[tuple[int, list[str]]]:
    """(line number, argv) of inline code spans in the prose that start with a CLI (`[--opt X]` = optional)."""
    text = README.read_text()
    out = []
    for m in re.finditer(r"`((?:%s)\b[^`]*)`" % "|".join(CLIS), text):
        argv = shlex.split(m.group(1).replace("[", " ").replace("]", " "))
        out.append((text.count("\n", 0, m.start()) + 1, argv))
    return out


def cli_commands() -> dict[str, click.Command]:
    from vtt.pipeline.cli import main as prep
    from vtt.trainer.tools.caption import main as caption
    from vtt.trainer.cli import main as train
    from vtt.trainer.tools.gen_eval import main as evaluate
    return {"vtt-prep": prep, "vtt-train": train, "vtt-caption": caption, "vtt-eval": evaluate}


def option_names(cmd: click.Command, parent: click.Context | None = None) -> set[str]:
    # contexts as click's own make_context builds them: click caches the help option it makes on the command
    ctx = click.Context(cmd, parent=parent, **cmd.context_settings)
    names = set()
    for p in cmd.get_params(ctx):
        if isinstance(p, click.Option):
            names.update(p.opts + p.secondary_opts)
    return names


def unknown_options(argv: list[str]) -> list[str]:
    cmd = cli_commands()[argv[0]]
    args, parent = argv[1:], None
    if isinstance(cmd, click.Group):
        parent = click.Context(cmd, **cmd.context_settings)
        sub = next((a for a in args if not a.startswith("-")), None)
        if sub is None and not args:  # the bare name, in prose
            return []
        if sub not in cmd.commands:
            return [f"no subcommand {sub!r}"]
        cmd, args = cmd.commands[sub], args[args.index(sub) + 1:]
    known = option_names(cmd, parent)
    return [a for a in args if a.startswith("--") and a.split("=", 1)[0] not in known]


def test_readme_has_command_lines_for_every_cli():
    found = {argv[0] for _, argv in commands()}
    assert found == set(CLIS), found


def test_every_readme_option_exists():
    bad = [f"README.md:{n}: {shlex.join(argv)}: {unknown}" for n, argv in commands()
           if (unknown := unknown_options(argv))]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("argv,unknown", [
    (["vtt-train", "--shards", "s3://b/s", "--out", "runs/x"], ["--out"]),
    (["vtt-prep", "extract", "d", "o", "--size=64", "--nope"], ["--nope"]),
    (["vtt-prep", "nosuch", "d"], ["no subcommand 'nosuch'"]),
    (["vtt-train", "--lora", "--no-lora", "--offload-optimizer", "-o", "r"], []),
])
def test_the_check_catches_what_it_should(argv, unknown):
    assert unknown_options(argv) == unknown
