"""The training phases, each declared once: its name, script, settings class, checkpoint folder, the phase it
starts from, how it is scored and what a person calls it. Every table that needs one of these facts reads it here
(paths.py turns a phase and a tag into its checkpoint dir). Torch-free and import-free on purpose: the
supervisor's `--help` reads it; `settings.config_of(phase)` gives a phase's settings class."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PhaseInfo:
    name: str  # the --phase word: base, mid, sft, rl
    run_name: str  # the script's name, and what its checkpoints' meta records as "phase"
    config: str  # the name of its settings class in nanochat/settings.py (its script parses the command line into it)
    folder: str  # where its checkpoints live, under the base dir: <folder>/<model tag>
    source: str | None  # the phase whose final checkpoint it starts from (base: none, a fresh model)
    metric: str  # how its checkpoints are scored: "bpb" (validation bits per byte) or "accuracy" (on tasks)
    label: str  # what a person calls it (plot titles)

    @property
    def script(self) -> str:
        """The module torchrun runs: scripts.<run_name>."""
        return f"scripts.{self.run_name}"


# in order: each starts from the one before it
PHASES: dict[str, PhaseInfo] = {
    p.name: p
    for p in (
        PhaseInfo("base", "base_train", "TrainConfig", "base_checkpoints", None, "bpb", "base training"),
        PhaseInfo("mid", "mid_train", "MidConfig", "mid_checkpoints", "base", "bpb", "midtraining"),
        PhaseInfo("sft", "chat_sft", "SFTConfig", "chatsft_checkpoints", "mid", "accuracy",
                  "supervised finetuning (SFT)"),
        PhaseInfo("rl", "chat_rl", "RLConfig", "chatrl_checkpoints", "sft", "accuracy",
                  "reinforcement learning (RL)"),
    )
}  # fmt: skip
DEFAULT = PHASES["base"]  # the phase `nanochat-run train` runs without --phase or --script


def by_script(script: str) -> PhaseInfo | None:
    """The phase whose script `script` (a module name) is; None for another script."""
    return next((p for p in PHASES.values() if p.script == script), None)


def by_folder(folder: str) -> PhaseInfo | None:
    """The phase whose checkpoint folder is named `folder`; None for another folder."""
    return next((p for p in PHASES.values() if p.folder == folder), None)


def recorded_phase(meta: dict | None) -> str:
    """The phase a checkpoint's meta says made it (its run name, e.g. "chat_sft"). Metas written before the meta
    said so were all base training's."""
    return (meta or {}).get("phase", DEFAULT.run_name)


def scored_by_bpb(run_name: str) -> bool:
    """Whether checkpoints of the phase that records `run_name` are scored by validation bits per byte (else by
    task accuracy)."""
    return any(p.run_name == run_name and p.metric == "bpb" for p in PHASES.values())
