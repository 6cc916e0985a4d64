"""Command-line settings: every spelling users type, and every error path."""

import dataclasses
import re
import subprocess
import sys

import pytest

from nanochat.config import ConfigError, parse_args
from nanochat.registry import PHASES
from scripts.base_train import TrainConfig


def parse(*argv: str) -> TrainConfig:
    return parse_args(TrainConfig(), list(argv))[0]


def test_spellings_equals_space_dashes_and_torchrun_separator():
    cfg = parse("--", "--depth=4", "--save-every", "7", "--max_seq_len", "64", "--matrix-lr=0.05", "--run=x")
    assert (cfg.depth, cfg.max_seq_len, cfg.matrix_lr, cfg.run) == (4, 64, 0.05, "x")


def test_overrides_are_reported_and_defaults_kept():
    cfg, overrides = parse_args(TrainConfig(), ["--depth=4"])
    assert overrides == {"depth": 4}
    assert cfg.max_seq_len == TrainConfig().max_seq_len
    assert cfg.tag == "d4" and parse("--model_tag=mine").tag == "mine"


def test_integers_accept_scientific_notation_but_not_fractions():
    assert parse("--total_batch_size=5e5").total_batch_size == 500000
    with pytest.raises(ConfigError, match="--depth: expected an integer, got '2.5'"):
        parse("--depth=2.5")


@pytest.mark.parametrize("script, config", [(p.script, p.config) for p in PHASES.values()])  # every phase's
def test_no_float_setting_takes_nan_or_infinity(script, config):
    """nan passes every range check (each comparison is false); no setting means anything with nan or infinity."""
    import importlib
    import typing

    defaults = getattr(importlib.import_module(script), config)()
    floats = [k for k, t in typing.get_type_hints(type(defaults)).items() if t is float]
    assert "matrix_lr" in floats and "warmdown_ratio" in floats
    for key in floats:
        for raw in ("nan", "NaN", "inf", "-inf", "Infinity", "1e999"):
            with pytest.raises(ConfigError) as err:
                parse_args(defaults, [f"--{key}={raw}"])
            assert (
                str(err.value) == f"--{key}: expected a finite number, got {raw!r} (nan and infinity are not allowed)"
            )
        assert parse_args(defaults, [f"--{key}={getattr(defaults, key)!r}"])[0] == defaults  # a number still is one


@pytest.mark.parametrize("script", ["scripts.chat_cli", "scripts.chat_web"])
def test_chat_temperature_refuses_nan_and_infinity(script, capsys):
    """--temperature nan passed `< 0` and reached the sampler."""
    import importlib

    parse = importlib.import_module(script).parse
    for raw in ("nan", "inf"):
        with pytest.raises(SystemExit) as stop:
            parse(["--temperature", raw])
        assert stop.value.code == 2
        assert f"error: argument --temperature: invalid finite_float value: '{raw}'" in capsys.readouterr().err
    assert parse(["--temperature", "0.5"]).temperature == 0.5


def test_bools_and_bare_flags():
    assert parse("--compile=False").compile == "False"
    from dataclasses import dataclass

    @dataclass
    class C:
        resume: bool = True
        n: int = 1

    assert parse_args(C(), ["--resume=False"])[0].resume is False
    assert parse_args(C(), ["--resume", "no"])[0].resume is False
    assert parse_args(C(), ["--resume", "--n=2"])[0] == C(True, 2)
    with pytest.raises(ConfigError, match="expected True or False"):
        parse_args(C(), ["--resume=maybe"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dpeth=4"], "unknown setting --dpeth; did you mean --depth?"),
        (["--zzzzzz=1"], "unknown setting --zzzzzz; valid settings: run, "),
        (["--depth=four"], "--depth: expected an integer, got 'four'"),
        (["--matrix_lr=fast"], "--matrix_lr: expected a number, got 'fast'"),
        (["--depth"], "--depth needs a value"),
        (["depth=4"], "unexpected argument 'depth=4'"),
        (["--depth=0"], "--depth must be >= 1"),
        (["--device_type=tpu"], "--device_type must be auto, cuda or cpu"),
        (["--num_iterations=0"], "--num_iterations must be >= 1"),
        (["--total_batch_size=-5"], "--total_batch_size must be a positive token count or -1"),
        (["--eval_every=0"], "--eval_every takes a step count, or -1 for only at the end"),
        (["--sample_every=0"], "--sample_every takes a step count, or -1 to disable"),
        (["--warmup_ratio=0.9", "--warmdown_ratio=0.5"], "--warmup_ratio + --warmdown_ratio"),
        (["--compile=sometimes"], "--compile must be auto, True or False"),
        (["--model_tag=../../x"], "--model_tag='../../x' must be a plain name (letters, digits, '_', '.', '+', '-';"),
        (["--model_tag=a/b"], "--model_tag='a/b' must be a plain name"),
        (["--model_tag=.."], "--model_tag='..' must be a plain name"),
        (["--model_tag=."], "--model_tag='.' must be a plain name"),  # the phase's folder itself
        (["--model_tag=./x"], "--model_tag='./x' must be a plain name"),
        (["--model_tag=-x"], "--model_tag='-x' must be a plain name"),
        (["--model_tag=.hidden"], "--model_tag='.hidden' must be a plain name"),
        (["--model_tag=a\x00b"], "--model_tag='a\\x00b' must be a plain name"),
        (["--model_tag=a\nb"], "--model_tag='a\\nb' must be a plain name"),
        (["--model_tag=a\\b"], "--model_tag='a\\\\b' must be a plain name"),
        (["--model_tag=d20.run"], "--model_tag='d20.run' must be a plain name"),  # another tag's run dir
        (["--model_tag=" + "x" * 201], "must be a plain name"),
        (["--dist_timeout=0"], "--dist_timeout must be >= 1 second"),
    ],
)
def test_config_errors_name_the_key(argv, message):
    with pytest.raises(ConfigError) as err:
        parse(*argv)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dpeth=4"], "base_train: error: unknown setting --dpeth; did you mean --depth?"),
        (["--depth=x"], "base_train: error: --depth: expected an integer, got 'x'"),
        (
            ["--model_tag=../escape"],
            "base_train: error: --model_tag='../escape' must be a plain name (letters, digits, '_', '.', '+', '-';"
            " not starting with '.' or '-', not ending in '.run', at most 200 bytes): it names a folder under"
            " base_checkpoints/ (or the phase's folder); use --checkpoint_dir for another place",
        ),
        (
            ["--model_tag=."],
            "base_train: error: --model_tag='.' must be a plain name (letters, digits, '_', '.', '+',"
            " '-'; not starting with '.' or '-', not ending in '.run', at most 200 bytes): it names a folder under"
            " base_checkpoints/ (or the phase's folder); use --checkpoint_dir for another place",
        ),  # fmt: skip
        (
            ["--matrix_lr=nan"],
            "base_train: error: --matrix_lr: expected a finite number, got 'nan' (nan and infinity are not allowed)",
        ),  # fmt: skip
    ],
)
def test_trainer_config_error_is_one_line_without_traceback(argv, message, tmp_path):
    env = {"NANOCHAT_BASE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "scripts.base_train", *argv], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip() == message
    assert "Traceback" not in proc.stdout + proc.stderr


def test_help_lists_every_setting_with_its_default_and_meaning(tmp_path):
    env = {"NANOCHAT_BASE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "scripts.base_train", "--help"], capture_output=True, text=True,
                          env=env)  # fmt: skip
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    for f in dataclasses.fields(TrainConfig):  # each with its default, and a meaning after it
        default = re.escape(repr(getattr(TrainConfig(), f.name)))
        assert re.search(rf"^  --{f.name}={default} +\S", proc.stdout, re.M), f.name
    assert "--keep_last_n_checkpoints=3" in proc.stdout and "the final checkpoint is never pruned" in proc.stdout
    assert "\ncheckpoints (see nanochat/checkpoint/)\n" in proc.stdout  # the groups of the dataclass
    assert not (tmp_path / "base_checkpoints").exists()  # nothing started


def test_auto_eval_tokens_are_proportionate_to_the_run():
    from nanochat.loss_eval import EVAL_TOKENS_CAP, eval_token_count

    # a tiny CPU run (100 steps of 1024 tokens, one final evaluation): a tenth of its 102,400 training tokens
    assert eval_token_count(-1, -1, 100, 1024) == 10_240
    # the same tokens spread over 4 evaluations (every 25 steps): a tenth in all
    assert eval_token_count(-1, 25, 100, 1024) == 2_560
    # every 30 steps: at 30, 60, 90 and the final one at 100, 4 evaluations
    assert eval_token_count(-1, 30, 100, 1024) == 100 * 1024 // 40
    # a full-size run: capped at what nanochat reads (20 x 524288 tokens)
    assert eval_token_count(-1, 250, 21_400, 524_288) == EVAL_TOKENS_CAP == 20 * 524_288
    assert eval_token_count(4096, 250, 100, 1024) == 4096  # asked for: as asked
