"""The jobs' command lines are derived from the config dataclasses: a flag per field, its value landing in the
config, its help the field's docstring with the default shown, its type and choices checked by argparse."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import pytest

from mura_ray.config import (
    DEMO_TRAIN_DEFAULTS,
    DEMO_TUNE_DEFAULTS,
    IngestConfig,
    ScoreConfig,
    TrainConfig,
    TuneConfig,
    add_config_arguments,
)
from mura_ray.report import ReportConfig

JOBS = Path(__file__).resolve().parents[1] / "jobs"
CONFIGS = {"ingest": IngestConfig, "train": TrainConfig, "tune": TuneConfig, "score": ScoreConfig,
           "report": ReportConfig}
NOT_FLAGS = {"tune": {"extra"}, "score": {"max_concurrency"}}
"""Fields without a flag of their own: tune's `extra` is for Python callers; score's `max_concurrency` is the MAX of
--concurrency MIN-MAX."""
EXTRA_FLAGS = {"train": {"config"}}
"""Flags that are not config fields: train's --config names a YAML recipe."""


def _job(name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"_config_test_{name}", JOBS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest != "help"}


def _sample(name: str, hint: Any, default: Any) -> Any:
    """A value of type `hint` other than `default`."""
    if get_origin(hint) in (Union, types.UnionType):
        (hint,) = [a for a in get_args(hint) if a is not type(None)]
    if get_origin(hint) is Literal:
        return next(choice for choice in get_args(hint) if choice != default)
    if hint is bool:
        return not default
    if hint is int:
        return (default or 0) + 3
    if hint is float:
        return (default or 0) + 0.25
    if hint is str:
        return f"s3://bucket/{name}"
    if get_origin(hint) is tuple:
        return ("s3://bucket/a", "s3://bucket/b")
    raise AssertionError(f"no sample for {name}: {hint}")


def _argv(action: argparse.Action, value: Any) -> list[str]:
    """The command line that sets `action`'s dest to `value`."""
    if isinstance(action, argparse.BooleanOptionalAction):
        return [action.option_strings[0 if value else 1]]
    flag = action.option_strings[0]
    if isinstance(value, tuple) and action.nargs == "+":
        return [flag, *value]
    if isinstance(value, tuple) and isinstance(action, argparse._AppendAction):
        return [part for item in value for part in (flag, item)]
    if isinstance(value, tuple):
        return [flag, ",".join(value)]
    return [flag, str(value)]


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default_factory is dataclasses.MISSING else f.default_factory()


@pytest.mark.parametrize("job", CONFIGS)
def test_every_field_has_a_flag_whose_value_lands_in_the_config(job, monkeypatch):
    cls, module = CONFIGS[job], _job(job)
    monkeypatch.setattr(cls, "validate", lambda self: self)  # the mapping is under test, not the value checks
    actions = _actions(module.build_parser())
    names = {f.name for f in dataclasses.fields(cls)}
    assert set(actions) == names - NOT_FLAGS.get(job, set()) | EXTRA_FLAGS.get(job, set())

    hints = get_type_hints(cls)
    want = {f.name: _sample(f.name, hints[f.name], _default(f)) for f in dataclasses.fields(cls)
            if f.name in actions}
    argv = [part for name, value in want.items() for part in _argv(actions[name], value)]
    cfg = module.build_config(module.build_parser().parse_args(argv))
    assert {name: getattr(cfg, name) for name in want} == want, argv


def test_score_concurrency_min_max_fills_both_fields(monkeypatch):
    score = _job("score")
    base = ["--model", "m", "--input", "i", "--out", "o"]
    parse = score.build_parser().parse_args
    cfg = score.build_config(parse([*base, "--concurrency", "2-5"]))
    assert (cfg.concurrency, cfg.max_concurrency) == (2, 5)
    cfg = score.build_config(parse(base))
    assert (cfg.concurrency, cfg.max_concurrency, cfg.models) == (1, None, ("m",))
    assert score.build_config(parse([*base, "--no-amp", "--no-report"])) == ScoreConfig(
        models=("m",), input="i", out="o", amp=False, report=False)


@pytest.mark.parametrize("job", CONFIGS)
def test_help_shows_each_docstring_with_its_default(job):
    cls, parser = CONFIGS[job], _job(job).build_parser()
    actions = _actions(parser)
    parser.format_help()  # every help string formats (a % in a docstring is escaped)
    for f in dataclasses.fields(cls):
        if f.name not in actions:
            continue
        text, default = actions[f.name].help, _default(f)
        assert text and "`" not in text, f.name
        if isinstance(default, bool):
            assert f"(default {'on' if default else 'off'})" in text, text
        elif isinstance(default, float):
            assert f"(default {default:g}" in text, text
        elif isinstance(default, (int, str)):
            assert f"(default {default}" in text, text


def test_help_names_the_demo_defaults():
    train, tune = _actions(_job("train").build_parser()), _actions(_job("tune").build_parser())
    assert train["epochs"].help == (f"Most epochs to train (default {TrainConfig.epochs}; "
                                    f"{DEMO_TRAIN_DEFAULTS['epochs']} for the demo).")
    assert train["batch_size"].help.endswith("(default 32).")  # the demo's value is the same: not repeated
    assert tune["demo_images"].help.endswith(f"(default 2000; {DEMO_TUNE_DEFAULTS['demo_images']} for the demo).")
    assert tune["image_size"].help.endswith("(48 for the demo).")  # no default of its own
    assert tune["backbones"].help.endswith("(custom_cnn,resnet18 for the demo).")  # in the flag's own format


@pytest.mark.parametrize(("job", "argv"), [
    ("ingest", ["--source", "tarball", "--root", "r", "--out", "o"]),
    ("train", ["--loss", "hinge"]),
    ("tune", ["--metric", "accuracy"]),
    ("score", ["--model", "m", "--input", "i", "--out", "o", "--gpu", "maybe"]),
])
def test_a_value_outside_a_literal_is_refused_with_exit_2(job, argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        _job(job).main(argv)
    assert exit_.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_report_refuses_a_value_outside_a_literal_in_one_line(tmp_path, capsys):
    argv = ["--predictions", "p", "--out", str(tmp_path), "--calibrate-level", "patient"]
    assert _job("report").main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: argument --calibrate-level: invalid choice"), err


def test_a_missing_required_flag_is_refused_with_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        _job("ingest").main(["--root", "r", "--out", "o"])
    assert exit_.value.code == 2
    assert "the following arguments are required: --source" in capsys.readouterr().err


def test_train_layers_flags_over_the_recipe_over_the_demo_defaults(tmp_path):
    train = _job("train")
    parse = train.build_parser().parse_args
    assert train.build_config(parse([])).epochs == DEMO_TRAIN_DEFAULTS["epochs"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("epochs: 7\nlr: 0.01\n")
    cfg = train.build_config(parse(["--config", str(recipe), "--epochs", "9", "--no-multitask"]))
    assert (cfg.epochs, cfg.lr, cfg.multitask, cfg.image_size) == (9, 0.01, False, DEMO_TRAIN_DEFAULTS["image_size"])


def test_tune_backbones_take_a_comma_separated_list():
    tune = _job("tune")
    cfg = tune.build_config(tune.build_parser().parse_args(["--backbones", "custom_cnn, resnet18,"]))
    assert cfg.backbones == ("custom_cnn", "resnet18")


def test_a_field_without_a_docstring_has_no_flag():
    @dataclass(frozen=True)
    class Undocumented:
        size: int = 1

    with pytest.raises(TypeError, match="Undocumented.size has no docstring"):
        add_config_arguments(argparse.ArgumentParser(), Undocumented)


def test_a_threshold_policy_outside_its_forms_is_refused():
    from mura_ray.config import UserError

    for ok in ("kappa", "youden", "fixed", "sensitivity:0.95"):
        TrainConfig(threshold_policy=ok).validate()
    for bad in ("kap", "sensitivity:1.5", "fixed:0.3"):
        with pytest.raises(UserError, match=f"--threshold-policy '{bad}' is not one of kappa, youden"):
            TrainConfig(threshold_policy=bad).validate()
