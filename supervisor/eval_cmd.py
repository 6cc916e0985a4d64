"""`nanochat-run eval`: evaluate several checkpoints of one run, each on its own, as an ensemble and as a weight
average; print a table, write a JSON record and a plot into the run dir. The evaluation is nanochat/ensemble.py's;
this module checks the request, runs it in an order that keeps two sets of weights at most, and reports.

Progress and warnings go to stderr, so that stdout holds only the table (or the JSON record, with --json).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from nanochat import checkpoint, safefile
from nanochat.checkpoint import Checkpoint
from nanochat.config import ConfigError
from nanochat.registry import DEFAULT, scored_by_bpb
from supervisor.launch import UsageProblem
from supervisor.options import PhaseOption, resolve_dirs


@dataclass
class EvalRequest:
    """What `nanochat-run eval` was asked (the command's options, resolved to directories)."""

    ckpt_dir: Path
    run_dir: Path
    checkpoints: str = "last:5"  # all | last:N | steps, e.g. 1000,2000
    modes: str = "each,ensemble,average"
    tasks: str | None = None  # chat phases; None: chat_eval's default
    max_problems: int = 200  # per task, chat phases
    max_tokens: int = 256  # the longest generated answer, chat phases
    eval_tokens: int | None = None  # base and mid; None: the trainer's amount
    json_out: bool = False
    save: Path | None = None  # write the weight average here as a checkpoint


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(req: EvalRequest) -> dict:
    """Check the request, evaluate, write the record and the plot, print the table (or the record). Bad input is a
    UsageProblem, found before any weights are loaded."""
    try:
        record = evaluate(req, check(req))
    except ConfigError as e:  # bad input found by the library (a spec, a step, a task): one line, exit 2
        raise UsageProblem(str(e)) from None
    write_outputs(record, req.run_dir)
    if req.json_out:
        print(json.dumps(record, indent=1))
    else:
        from supervisor.report import console

        console().print(table(record))
        print(f"record: {record['record']}\nplot: {record['plot']}")
    return record


@dataclass
class Plan:
    """A checked request: what to evaluate, and how."""

    modes: list[str]
    ckpts: list[Checkpoint]  # oldest first, verified, one model config
    phase: str  # the checkpoints' own (their meta's), which decides the metric
    bpb: bool  # scored by validation bits per byte (base, mid), else by task accuracy (sft, rl)
    tasks: list | None  # the chat phases' tasks
    not_ensembled: list[str]  # generative tasks, which an ensemble cannot score


def check(req: EvalRequest) -> Plan:
    from nanochat import ensemble as E

    modes = E.parse_modes(req.modes)
    E.parse_spec(req.checkpoints)
    if req.max_problems < 1 or req.max_tokens < 1:
        raise UsageProblem("--max-problems and --max-tokens must be >= 1")
    if req.eval_tokens is not None and req.eval_tokens < 1:
        raise UsageProblem(f"--eval-tokens must be >= 1 (or left out: the trainer's amount), got {req.eval_tokens}")
    if req.save is not None and "average" not in modes:
        raise UsageProblem("--save writes the weight average: add average to --mode")
    if req.save is not None and any(c.committed for c in checkpoint.scan(req.save)):
        raise UsageProblem(f"{req.save} already holds checkpoints: pass a new or empty dir to --save")
    if not req.ckpt_dir.is_dir():
        raise UsageProblem(f"no checkpoint dir at {req.ckpt_dir}: pass --checkpoint-dir, --model-tag or --phase")
    ckpts = E.select(req.ckpt_dir, req.checkpoints, lambda msg: say(f"warning: {msg}"))
    phase = ckpts[-1].meta.phase
    bpb = scored_by_bpb(phase)
    if bpb and req.tasks is not None:
        raise UsageProblem(f"--tasks is for the chat phases (sft, rl); {phase} checkpoints are scored by validation"
                           " bits per byte")  # fmt: skip
    if not bpb and req.eval_tokens is not None:
        raise UsageProblem(f"--eval-tokens is for base and mid checkpoints; {phase} ones are scored by task accuracy")
    tasks = None if bpb else E.chat_tasks(req.tasks or E.CHECKABLE, req.max_problems)
    not_ensembled = [t.name for t in tasks or [] if t.eval_type != "categorical"] if "ensemble" in modes else []
    if tasks and len(not_ensembled) == len(tasks):
        raise UsageProblem(f"an ensemble scores multiple-choice tasks only ({', '.join(E.CATEGORICAL)}): add one to"
                           " --tasks, or leave ensemble out of --mode")  # fmt: skip
    return Plan(modes, ckpts, phase, bpb, tasks, not_ensembled)


def evaluate(req: EvalRequest, plan: Plan) -> dict:
    """Run the plan; the record. The average goes first, while no model is built (its running sum and one loaded
    checkpoint); then the model holding it takes each checkpoint in turn: two sets of weights at most."""
    import torch

    from nanochat import ensemble as E
    from nanochat.tokenizer import get_tokenizer

    meta, modes, ckpts = plan.ckpts[-1].meta, plan.modes, plan.ckpts
    try:
        tokenizer = get_tokenizer()
    except ValueError as e:  # a malformed tokenizer file (a missing one is an OSError: one line too)
        raise UsageProblem(str(e)) from None
    if meta.model_config["vocab_size"] != tokenizer.vocab_size:
        raise checkpoint.CheckpointError(
            f"the checkpoints in {req.ckpt_dir} have a vocabulary of {meta.model_config['vocab_size']}, the"
            f" tokenizer {tokenizer.vocab_size}: evaluate them with the tokenizer they were trained with"
        )
    if meta.tokenizer and tokenizer.fingerprint and meta.tokenizer != tokenizer.fingerprint:
        say("warning: the tokenizer differs from the one these checkpoints were trained with (same vocabulary size)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if plan.bpb:
        evaluation = E.validation(meta, tokenizer, device, req.eval_tokens or -1)
    else:
        evaluation = E.Accuracy(plan.tasks, tokenizer, req.max_tokens)
    steps = [c.step for c in ckpts]
    say(f"eval: {plan.phase} checkpoints at steps {', '.join(map(str, steps))} in {req.ckpt_dir}, on {device}: "
        + ", ".join(modes))  # fmt: skip
    if plan.not_ensembled:
        say(f"warning: the ensemble scores the multiple-choice tasks only; {', '.join(plan.not_ensembled)} need"
            " every model at once to generate an answer: not ensembled")  # fmt: skip

    t0 = time.perf_counter()
    record = {"time": time.time(), "checkpoint_dir": str(req.ckpt_dir), "phase": plan.phase, "device": str(device),
              "metric": evaluation.metric, "lower_is_better": evaluation.lower_is_better, "modes": modes,
              "evaluation": evaluation.describe(), "checkpoints": [], "ensemble": None, "average": None}  # fmt: skip
    model = None
    if "average" in modes:
        state = E.average(req.ckpt_dir, ckpts, device)
        model = E.build(meta, device)
        model.load_state_dict(state)
        del state
        scores = E.score(model, evaluation)
        say(f"average of {len(ckpts)}: {line(scores)}")
        record["average"] = {"of": steps, "scores": scores, "saved": None}
        if req.save is not None:
            out = req.save.resolve()
            extra = {"val_bpb": scores["val_bpb"], "val_bpb_step": steps[-1]} if plan.bpb else {"accuracy": scores}
            saved = E.save_average(out, req.ckpt_dir, ckpts, model.state_dict(), extra)
            record["average"]["saved"] = str(out)
            say(f"saved the average as a weights-only checkpoint: {out} step {saved.step}")
    if "each" in modes or "ensemble" in modes:
        model = model if model is not None else E.build(meta, device)
        log = lambda ckpt, scores: say(f"step {ckpt.step}: {line(scores)}")  # noqa: E731
        per = E.each(model, req.ckpt_dir, ckpts, evaluation, pool="ensemble" in modes, solo="each" in modes, log=log)
        if "each" in modes:
            record["checkpoints"] = [
                {"step": c.step, "model_xxh3_64": checkpoint.source_record(req.ckpt_dir, c)["model_xxh3_64"],
                 "final": c.final, "weights_only": c.weights_only, "scores": s}
                for c, s in zip(ckpts, per)
            ]  # fmt: skip
        if "ensemble" in modes:
            scores = evaluation.pooled()
            say(f"ensemble of {len(ckpts)}: {line(scores)}")
            record["ensemble"] = {"of": steps, "scores": scores, "not_ensembled": plan.not_ensembled}
    record["seconds"] = round(time.perf_counter() - t0, 1)
    return record


def line(scores: dict) -> str:
    return ", ".join(f"{k} {fmt(k, v)}" for k, v in scores.items())


def fmt(column: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if column == "val_bpb" else f"{100 * value:.1f}%"


def columns(record: dict) -> list[str]:
    """The score columns, in the order first seen: val_bpb, or the task names."""
    found: dict[str, None] = {}
    rows = [c["scores"] for c in record["checkpoints"]]
    rows += [record[k]["scores"] for k in ("ensemble", "average") if record[k]]
    for scores in rows:
        found.update(dict.fromkeys(scores))
    return list(found)


def table(record: dict):
    """One row per checkpoint, then the ensemble and the average; a column per score."""
    from rich.table import Table

    cols = columns(record)
    what = "validation bits per byte" if record["metric"] == "val_bpb" else "accuracy"
    t = Table(title=f"{record['phase']} checkpoints in {record['checkpoint_dir']}: {what} ({record['device']})")
    t.add_column("model")
    for col in cols:
        t.add_column(col.replace("_", " "), justify="right")
    for c in record["checkpoints"]:
        kind = " (final)" if c["final"] else " (weights only)" if c["weights_only"] else ""
        t.add_row(f"step {c['step']}{kind}", *(fmt(col, c["scores"].get(col)) for col in cols))
    for mode in ("ensemble", "average"):
        if entry := record[mode]:
            t.add_row(f"{mode} of {len(entry['of'])}", *(fmt(col, entry["scores"].get(col)) for col in cols))
    return t


def write_outputs(record: dict, run_dir: Path) -> None:
    """eval-<time>.json and eval-<time>.png in the run dir (made if missing); their paths go into the record."""
    checkpoint.make_dir(run_dir)
    stem, n = time.strftime("eval-%Y%m%d-%H%M%S"), 1
    base = stem
    while (run_dir / f"{stem}.json").exists():  # two evaluations within a second must not collide
        stem, n = f"{base}-{n}", n + 1
    record["record"], record["plot"] = str(run_dir / f"{stem}.json"), str(run_dir / f"{stem}.png")
    plot(record, Path(record["plot"]))
    checkpoint.write_text_atomic(Path(record["record"]), json.dumps(record, indent=1))


def plot(record: dict, path: Path) -> None:
    """The metric against the step for each checkpoint; the ensemble (dashed) and the average (dotted) as
    horizontal lines, in the colour of their column."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
    from matplotlib.ticker import MaxNLocator

    cols = columns(record)
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for i, col in enumerate(cols):
        # one column (bpb): a colour per mode; several (tasks): a colour per task, a line style per mode
        name, colors = ("", ["C0", "C1", "C2"]) if len(cols) == 1 else (f"{col}: ", [f"C{i}"] * 3)
        points = [(c["step"], c["scores"][col]) for c in record["checkpoints"] if col in c["scores"]]
        if points:
            ax.plot(*zip(*points), marker="o", color=colors[0], label=f"{name}each checkpoint")
        for mode, style, color in (("ensemble", "--", colors[1]), ("average", ":", colors[2])):
            if (entry := record[mode]) and col in entry["scores"]:
                ax.axhline(entry["scores"][col], color=color, linestyle=style,
                           label=f"{name}{mode} of {len(entry['of'])}")  # fmt: skip
    steps = (record["ensemble"] or record["average"] or {}).get("of") or [c["step"] for c in record["checkpoints"]]
    pad = max(1, (max(steps) - min(steps)) * 0.05)
    ax.set_xlim(min(steps) - pad, max(steps) + pad)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    accuracy = f"{cols[0]} accuracy" if len(cols) == 1 else "accuracy"
    ax.set_ylabel("validation bits per byte" if record["metric"] == "val_bpb" else accuracy)
    ax.set_title(f"{record['phase']} checkpoints in {Path(record['checkpoint_dir']).name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    safefile.write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120), durable=False)


# the command (registered on the app in supervisor/cli.py)


def command(
    checkpoint_dir: Annotated[Path | None, typer.Option(help="A checkpoint dir.")] = None,
    depth: Annotated[int | None, typer.Option(help="Find the checkpoint dir from the depth (d<depth>).")] = None,
    model_tag: Annotated[str | None, typer.Option(help="Find the checkpoint dir from the model tag.")] = None,
    phase: PhaseOption = DEFAULT.name,
    checkpoints: Annotated[
        str, typer.Option(help="Which ones: last:N (the newest N valid), all, or steps such as 1000,2000,3000.")
    ] = "last:5",
    mode: Annotated[
        str,
        typer.Option(
            help="Comma-separated: each (every checkpoint), ensemble (their mean output probabilities),"
            " average (their mean weights)."
        ),
    ] = "each,ensemble,average",
    tasks: Annotated[
        str | None, typer.Option(help="sft and rl checkpoints: the tasks to score. Default: chat_eval's.")
    ] = None,
    max_problems: Annotated[int, typer.Option(help="sft and rl: problems per task, from its test split.")] = 200,
    max_tokens: Annotated[int, typer.Option(help="sft and rl: the longest generated answer, in tokens.")] = 256,
    eval_tokens: Annotated[
        int | None, typer.Option(help="base and mid: validation tokens. Default: what the trainer evaluates.")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the JSON record instead of the table.")] = False,
    save: Annotated[
        Path | None, typer.Option(help="Write the weight average into this new dir as a checkpoint of its own.")
    ] = None,
) -> None:
    """Evaluate several checkpoints of one run: each one, their ensemble and their weight average, by validation
    bits per byte (base, mid) or task accuracy (sft, rl). A table, and a JSON record and a plot in the run dir."""
    ckpt_dir, run_path = resolve_dirs(checkpoint_dir, None, depth, model_tag, phase=phase)
    request = EvalRequest(ckpt_dir, run_path, checkpoints, mode, tasks, max_problems, max_tokens, eval_tokens,
                          json_out, save.expanduser() if save else None)  # fmt: skip
    try:
        run(request)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
