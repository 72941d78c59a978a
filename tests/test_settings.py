"""The one config mechanism (vtt.shards.settings): one ConfigError, flags made from the fields they set (names,
defaults and help in one place), values converted by the code that converts YAML and --set, configs that
validate without I/O and a preflight for what needs the world."""
from __future__ import annotations

import dataclasses
import re

import click
import pytest
from click.testing import CliRunner

from vtt.shards.settings import ConfigError, Flag, RawValue, click_options, coerce, flags_of, setting, values_of


@dataclasses.dataclass(frozen=True)
class Inner:
    rate: float = 0.5
    steps: int | None = None


@dataclasses.dataclass(frozen=True)
class Toy:
    name: str = setting("toy", "--name", "The name.")
    count: int = setting(3, "--count", "How many.", short="-c")
    tags: tuple[str, ...] = setting((), "--tag", "A tag (repeatable).", dest="tags", multiple=True)
    fast: bool = setting(False, "--fast/--slow", "Go fast.")
    inner: Inner = dataclasses.field(default_factory=Inner)


TABLE = [Flag("--rate", "The rate.", field="inner.rate"),
         Flag("--steps", "Steps.", field="inner.steps", default_text="as many as it takes")]


def toy_command():
    seen = {}

    @click.command()
    @click_options(flags_of(Toy), Toy)
    @click_options(TABLE, Toy)
    def cmd(**params):
        seen.update(params)
    return cmd, seen


def test_one_config_error_for_both_halves():
    from vtt.pipeline.config import ConfigError as prep_error
    from vtt.trainer.config import ConfigError as train_error
    from vtt.trainer.run.ds_config import DeepSpeedConfigError
    assert prep_error is train_error is ConfigError and issubclass(DeepSpeedConfigError, ConfigError)


def test_help_shows_the_dataclass_default_and_the_flag_left_out_is_none():
    cmd, seen = toy_command()
    res = CliRunner().invoke(cmd, ["--help"])
    text = " ".join(res.output.split())
    assert "The name. [default: toy]" in text and "-c, --count INTEGER How many. [default: 3]" in text
    assert "--fast / --slow Go fast. [default: off]" in text and "The rate. [default: 0.5]" in text
    assert "Steps. [default: as many as it takes]" in text
    res = CliRunner().invoke(cmd, [])
    assert res.exit_code == 0 and values_of(flags_of(Toy) + TABLE, seen) == {}


def test_flag_values_are_converted_as_yaml_and_set_values_are():
    cmd, seen = toy_command()
    res = CliRunner().invoke(cmd, ["-c", "7", "--tag", "a", "--tag", "b", "--slow", "--rate", "3e-4",
                                   "--steps", "null"])
    assert res.exit_code == 0, res.output
    assert values_of(flags_of(Toy) + TABLE, seen) == {"count": 7, "tags": ("a", "b"), "fast": False,
                                                      "inner.rate": 3e-4}  # --steps null: None, left out
    res = CliRunner().invoke(cmd, ["--count", "many"])
    assert res.exit_code == 2 and "Invalid value for '--count' / '-c': expected int, got str 'many'" in res.output
    assert coerce(RawValue("3e-4"), float, "x") == 3e-4  # YAML 1.1 alone would read a string
    assert coerce(RawValue("4"), int | str | None, "x") == 4 and coerce(RawValue("auto"), int | str | None, "x") == "auto"
    assert coerce(RawValue("{description_fr}"), str, "x") == "{description_fr}"
    assert coerce(RawValue("[0.9, 0.95]"), tuple[float, float], "x") == (0.9, 0.95)
    with pytest.raises(ConfigError, match=r"x: expected 2 values"):
        coerce(RawValue("[0.9]"), tuple[float, float], "x")


def test_no_help_text_restates_a_default():
    """Defaults live in the dataclasses; the help's [default: ...] is made from them, never written by hand."""
    from vtt.pipeline.config import CompactConfig, PrepConfig
    from vtt.trainer.config import FLAGS
    for flag in [*flags_of(PrepConfig), *flags_of(CompactConfig), *FLAGS]:
        assert not re.search(r"default", flag.help, re.IGNORECASE), flag.name


def test_every_train_flag_sets_a_field_and_a_flag_equals_its_set():
    from vtt.shards.settings import field_of
    from vtt.trainer.cli import main
    from vtt.trainer.config import FLAGS, TrainConfig, load_config, overrides_from_flags
    for flag in FLAGS:
        field_of(TrainConfig, flag.field)  # a KeyError names a flag whose field is gone
    base = ["--model", "seq2seq", "--model-path", "M", "--shards", "S", "--output-dir", "RUN"]
    params = main.make_context("vtt-train", base + ["--micro-batch", "4", "--lr", "3e-4"]).params
    by_flag = load_config(None, overrides_from_flags(params, params["sets"]))
    params = main.make_context("vtt-train", base + ["--set", "deepspeed.micro_batch_size=4",
                                                    "--set", "optim.lr=3e-4"]).params
    by_set = load_config(None, overrides_from_flags(params, params["sets"]))
    assert by_flag == by_set and by_flag.deepspeed.micro_batch_size == 4 and by_flag.optim.lr == 3e-4


def test_prep_config_validates_without_io_and_preflight_checks_the_world(tmp_path):
    from vtt.pipeline.config import PrepConfig, preflight
    cfg = PrepConfig(tmp_path / "no-data", "nosuchfs://bucket/shards", annotations=(tmp_path / "no.jsonl",))
    assert cfg.out_dir == "nosuchfs://bucket/shards" and cfg.size == (336, 336)  # built: nothing was looked at
    with pytest.raises(ConfigError, match=r"annotation file .*no\.jsonl does not exist"):
        preflight(cfg)
    with pytest.raises(ConfigError, match="data folder .*no-data does not exist"):
        preflight(dataclasses.replace(cfg, annotations=()))
    with pytest.raises(ConfigError, match="no filesystem for nosuchfs://"):
        preflight(PrepConfig(tmp_path, "nosuchfs://bucket/shards"))
    with pytest.raises(ConfigError, match="num_frames"):  # the settings themselves still fail at once
        PrepConfig(tmp_path, tmp_path / "out", num_frames=0)
    again = PrepConfig(tmp_path, tmp_path / "out", given=frozenset({"size"})).from_folder({"num_frames": 5})
    assert again.num_frames == 5 and again.frame_spec().num_frames == 5
