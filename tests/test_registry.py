"""The phase registry (each phase declared once, every place that needs its facts reading them there) and what
its settings declare about themselves."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from nanochat.paths import model_dir, phase_dir, phase_dirs
from nanochat.registry import DEFAULT, PHASES, by_folder, by_script, recorded_phase, scored_by_bpb
from nanochat.settings import config_of
from supervisor.launch import phase_of_script, resolve
from supervisor.options import resolve_dirs
from tests.runs import REPO_ROOT


def test_the_phases_chain_in_order_and_each_script_is_its_entry():
    assert list(PHASES) == ["base", "mid", "sft", "rl"] and DEFAULT is PHASES["base"]
    assert [p.source for p in PHASES.values()] == [None, "base", "mid", "sft"]
    for p in PHASES.values():
        script = importlib.import_module(p.script)
        assert script.PHASE is p  # the script names itself (its meta's "phase", its error lines) from here
        assert dataclasses.is_dataclass(config_of(p)) and getattr(script, p.config) is config_of(p)
        assert by_script(p.script) is p and by_folder(p.folder) is p
    assert by_script("scripts.demo") is None and by_folder("elsewhere") is None


def test_a_phase_checkpoint_dir_is_one_formula_that_trainer_and_supervisor_share(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    assert phase_dir("sft", "d4") == tmp_path / "chatsft_checkpoints" / "d4"
    assert phase_dir("base") == tmp_path / "base_checkpoints"
    for phase in ("mid", "sft", "rl"):  # a chat phase saves beside its source, under the same tag
        phase_dir(PHASES[phase].source, "x").mkdir(parents=True)
        assert phase_dirs(phase, "x") == (phase_dir(phase, "x"), phase_dir(PHASES[phase].source, "x"))
        assert resolve(phase, PHASES[phase].script, ["--model_tag=x"], None).checkpoint_dir == phase_dir(phase, "x")
    assert resolve("base", "scripts.base_train", ["--depth=3"], None).checkpoint_dir == phase_dir("base", "d3")
    assert resolve("base", "tests.not_ours", [], None).checkpoint_dir == phase_dir("base", "d20")
    assert resolve_dirs(None, None, 3, None)[0] == phase_dir("base", "d3").resolve()
    phase_dir("rl", "x").mkdir(parents=True)
    assert resolve_dirs(None, None, None, None, phase="rl")[0] == phase_dir("rl", "x").resolve()  # its one model
    assert model_dir("mid") == phase_dir("mid", "x") and model_dir("mid", "y") == phase_dir("mid", "y")


def test_phase_and_script_pick_each_other():
    assert phase_of_script("base", None) == ("base", "scripts.base_train")
    assert phase_of_script("sft", None) == ("sft", "scripts.chat_sft")
    assert phase_of_script("base", "scripts.chat_rl") == ("rl", "scripts.chat_rl")  # a script of ours: its phase
    assert phase_of_script("mid", "my.trainer") == ("mid", "my.trainer")


def test_what_a_meta_records_and_how_its_checkpoints_are_scored():
    assert recorded_phase({"phase": "chat_sft"}) == "chat_sft"
    assert recorded_phase({}) == recorded_phase(None) == "base_train"  # metas from before the meta said so
    assert [scored_by_bpb(p.run_name) for p in PHASES.values()] == [True, True, False, False]
    assert not scored_by_bpb("demo")


def test_plot_titles_come_from_the_phase_label(tmp_path: Path):
    from supervisor.plot import PlotError, series

    d = tmp_path / "mid_checkpoints" / "d1"
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text('{"kind": "step", "step": 1, "loss": 2.0, "time": 0}\n')
    run = series(d, tmp_path / "none.run")
    assert run.phase == "mid" and run.title == "midtraining: mid_checkpoints/d1"
    with pytest.raises(PlotError):
        series(tmp_path / "empty", tmp_path / "none.run")


def test_the_supervisor_parses_a_phase_settings_without_a_training_script_or_torch():
    """`nanochat-run train --help` and a bad setting must answer in a blink: the settings classes live in the
    torch-free nanochat/settings.py, and the registry names them."""
    code = (
        "import sys; from supervisor.launch import parse_settings;"
        " assert parse_settings('scripts.chat_rl', ['--save_every=7']).save_every == 7;"
        " print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('scripts')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_what_a_rerun_may_change_is_marked_on_the_settings():
    """runtime: a speedrun rerun may change it (a resume logs it); quiet: not even logged; unmarked: the model's.
    A phase that only changes a default (RL's save_every, SFT's device_batch_size) keeps the field's mark."""
    from nanochat import resume
    from nanochat.settings import RLConfig, SFTConfig, TrainConfig, rerun_mark
    from supervisor.speedrun import settings_changed

    assert [rerun_mark(RLConfig, k) for k in ("save_every", "resume", "matrix_lr")] == ["runtime", "quiet", ""]
    assert rerun_mark(SFTConfig, "device_batch_size") == rerun_mark(RLConfig, "pass_k") == "runtime"
    assert rerun_mark(TrainConfig, "depth") == "" and rerun_mark(SFTConfig, "source_dir") == "quiet"
    saved = {"save_every": 1, "device_batch_size": 2, "run": "a", "depth": 20, "seed": 0}
    assert settings_changed(saved, TrainConfig()) == ""
    assert settings_changed(saved, TrainConfig(depth=4)) == "with --depth=20, this run asks for 4"
    assert settings_changed({"pass_k": 1, "temperature": 1.0}, RLConfig()) == ""
    assert settings_changed({"temperature": 0.5}, RLConfig()) == "with --temperature=0.5, this run asks for 1.0"
    current = {"save_every": 2, "device_batch_size": 2, "run": "b", "resume": False, "seed": 1}
    assert resume.changes(saved, current) == [{"setting": "save_every", "from": 1, "to": 2},
                                              {"setting": "seed", "from": 0, "to": 1}]  # fmt: skip


def test_the_supervisor_defaults_live_in_one_dataclass(tmp_path):
    """The options of `train` and `speedrun`, the agent's TrainOptions and the restart policy start from the same
    defaults: Supervision's (the policy's own settings: Policy's)."""
    from supervisor import cli
    from supervisor.launch import Launch, Supervision, TrainOptions, train_options
    from supervisor.policy import Policy

    opts = train_options(Launch("base", "x", [], tmp_path / "c"), tmp_path / "r", Supervision(nproc_per_node=1))
    assert opts == TrainOptions("x", [], opts.checkpoint_dir, opts.run_dir) and opts.policy == Policy()
    for command in (cli.train, cli.speedrun):
        params = inspect.signature(command).parameters
        names = ("max_restarts", "backoff", "hang_timeout", "startup_timeout", "oom_shrink", "progress_every",
                 "preemption")  # fmt: skip
        for name in names:
            assert params[name].default == getattr(Supervision(), name), (command.__name__, name)
