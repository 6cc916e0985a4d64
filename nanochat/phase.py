"""One training phase (base training, midtraining, SFT, RL): the settings they all share, the start (process
group, stop flag, the checkpoint directory held, where the run resumes from), and the training loop itself.

What differs between the phases is a `Recipe` (its model, optimizers, data, plan, loss, evaluation, samples), each
in its phase's own module: base training's in scripts/base_train.py, midtraining's and SFT's in chat_phase.py, RL's
in scripts/chat_rl.py. `Phase.train(recipe)` runs the loop over it, built from parts that each live once: the save
schedule and the stop flag (train_loop.py), the run's counters and the meta a save writes (counters.py), the
restore of a checkpoint (resume.py), the step lines, heartbeat, metrics and wandb (telemetry.py), the writing of
checkpoints (saver.py, checkpoint/).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch

from nanochat import checkpoint, node_dirs, resume, spare
from nanochat.checkpoint import CheckpointError, snapshots
from nanochat.common import cleanup_distributed, init_distributed, keep_freed_memory, print0, say_here, warn0, warn_here
from nanochat.config import ConfigError, describe
from nanochat.counters import Counters, meta_record
from nanochat.faults import Fault
from nanochat.gpt import GPT, GPTConfig
from nanochat.guard import Diverged, Guard, Verdict
from nanochat.loss_eval import eval_token_count
from nanochat.optim import Optimizers, lr_multiplier, muon_momentum
from nanochat.redact import redact, reveal
from nanochat.remote import Uploader, check_remote, restore_if_newer
from nanochat.saver import Saver
from nanochat.settings import LoopConfig, parse_skips
from nanochat.telemetry import Startup, Telemetry
from nanochat.train_loop import Due, SaveSchedule, StopFlag, check_replicas, find_start, rng_state, stopped

# `between(batches done, this rank's data exhausted)`, called by an evaluation before its first batch and after each:
# (a stop was agreed, every rank's data is exhausted)
Between = Callable[[int, bool], tuple[bool, bool]]
FINAL_EVAL_STOPPED = " in the final evaluation; run again to evaluate it"


class Loader(Protocol):
    """What the loop needs of a phase's training data: batches, and a position a checkpoint can hold."""

    def next_batch(self) -> tuple[torch.Tensor, ...]: ...  # (inputs, targets) unless the recipe has its own loss
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def load_resharded(self, states: list[dict]) -> None: ...


@dataclass
class Plan:
    """A phase's horizon and batch geometry, decided before the loop."""

    num_iterations: int
    seq_len: int  # tokens per row (a chat phase's -1 setting resolved to its model's context)
    grad_accum: int  # micro-batches per optimizer step on each rank
    tokens_per_step: int  # across all ranks (for tokens/s, MFU and the meta)
    eval_steps: int  # micro-batches (RL: problems) per evaluation on each rank


class Recipe(Protocol):
    """What differs between the phases. A phase's class subclasses this (for the defaults) and sets the attributes;
    `Phase.train(recipe)` restores their state from a checkpoint and runs the loop."""

    model: GPT
    optimizers: Optimizers
    loader: Loader
    plan: Plan  # from `Phase.plan`
    meta: dict  # goes into every checkpoint's meta (the source, tasks, tokenizer)
    # the evaluation's number: named so in the meta (with its step as `<metric>_step`), the logs and the heartbeat
    metric: str = "val_bpb"
    sample_every: int = -1  # steps between `sample` calls (and at the end); -1: never

    def loss(self, model: torch.nn.Module, batch: tuple) -> torch.Tensor:
        """A micro-batch's loss (`model`: the compiled one where it is compiled): the next-token loss by default."""
        return model(*batch)

    def evaluate(self, step: int, between: Between) -> float | None:
        """The metric of the model at `step` (in eval mode, under autocast), or None when `between` said stop."""
        ...

    def sample(self, step: int) -> None:
        """Show what the model writes at `step` (every rank calls it)."""

    def step_stats(self) -> dict[str, float]:
        """The phase's own numbers for a step line (called by every rank at each one: it may be a collective)."""
        return {}


class Phase:
    """A phase's run: `Phase(...)` starts it (the directory held, the resume point found), the script builds its
    recipe (model, optimizer, data), and `train(recipe)` resumes their state and runs the loop to the budget or a
    stop."""

    def __init__(self, name: str, cfg: LoopConfig, ckpt_dir: Path, overrides: dict) -> None:
        # the interpreter's start-up and our imports, before this (a warm spare's: since its go, nanochat/spare.py)
        self.times = Startup(time.perf_counter(), time.time() - spare.began())
        self.name, self.cfg, self.ckpt_dir, self.overrides = name, cfg, ckpt_dir, overrides
        # the real URL only opens the filesystem; the config (logged, and recorded in every meta) keeps it redacted
        self.remote_url = reveal(cfg.remote_dir) if cfg.remote_dir else ""
        cfg.remote_dir = redact(cfg.remote_dir)
        self.dist = init_distributed(cfg.device_type, cfg.dist_timeout)
        self.times.process_group = time.perf_counter()
        self.device = self.dist.device
        self.stop = StopFlag()  # from here on SIGINT/SIGTERM mean "save after the next step", even during start-up
        if self.device.type == "cpu":
            keep_freed_memory()  # before the model allocates anything: no page-fault churn every step
        torch.manual_seed(cfg.seed)
        print0(f"{name}: world size {self.dist.world_size}, device {self.device}\n{describe(cfg)}")
        self.fault = Fault.parse(cfg.debug_fault)
        if self.fault:
            self.fault.marker_dir = ckpt_dir
        rank = self.dist.rank
        self.machines = machines = self.dist.world_size // int(os.environ.get("LOCAL_WORLD_SIZE", self.dist.world_size))
        self.per_node = os.environ.get(node_dirs.ENV) == "1" and machines > 1
        if self.per_node and not cfg.remote_dir:
            raise ConfigError("a checkpoint dir per node needs --remote_dir: a node on a new machine restores from it")
        # on several machines, every machine's local rank 0 speaks for its own snapshots (and dir)
        say, warn = (say_here, warn_here) if machines > 1 else (print0, warn0)
        self.saver = Saver(
            ckpt_dir, cfg.keep_last_n_checkpoints, cfg.keep_optim_last_n,
            self.dist.master or self.per_node and self.dist.local_rank == 0, self.dist.local_rank == 0,
            self.dist.world_size, self.device,
            fault=(lambda phase: self.fault.at_save(phase, rank)) if self.fault else (lambda phase: None),
            warn=warn, log=say, async_save=cfg.async_save, keep_every=cfg.keep_every,
        )  # fmt: skip
        # Compression pays where bandwidth is the limit (a remote copy: ~1.2x fewer bytes to send), not on a local
        # disk (a checkpoint durable 2-3x later, for 18% of space; scripts/bench_storage.py). On a CPU trainer it
        # takes one core, so it does not compete with training; on GPU nodes up to 8.
        self.saver.codec = "zstd" if cfg.compress == "zstd" or cfg.compress == "auto" and cfg.remote_dir else "none"
        self.saver.codec_threads = 1 if self.device.type == "cpu" else min(8, os.cpu_count() or 1)
        self.saver.start()  # holds the directory from here on, and removes temp files of crashed saves
        remote = check_remote(self.remote_url) if self.remote_url else None
        if self.per_node and cfg.resume:
            node_dirs.before_start(ckpt_dir, remote, self.dist, self.saver.writer, say, warn, self.saver.verified)
        if remote and cfg.resume and self.dist.master:  # a fresh machine, a wiped disk: the remote may be newer
            restore_if_newer(remote, ckpt_dir, warn0, print0, self.saver.verified)
        self.resume_from, self.run_id = find_start(ckpt_dir, cfg.resume, self.dist, machines, self.saver.verified)
        if self.per_node:  # every node reads its own copy of a checkpoint on disk: the dirs are brought in step
            point = self.resume_from[1] if self.resume_from and self.resume_from[0] == ckpt_dir else None
            node_dirs.after_start(ckpt_dir, remote, self.dist, self.saver.writer, point, self.run_id, cfg.resume,
                                  say, warn)  # fmt: skip
        self.uploader, self.telemetry = None, None
        if remote and self.dist.master:
            keep = cfg.remote_keep_last_n or cfg.keep_last_n_checkpoints
            at_upload = self.fault.at_upload if self.fault else (lambda phase: None)
            # say_here: one write per line, as the uploader's thread prints between the training thread's lines
            self.uploader = Uploader(remote, ckpt_dir, keep, warn0, say_here, at_upload, self.run_id, cfg.keep_every)
            self.saver.on_durable = self.uploader.offer
            if self.resume_from is not None and self.resume_from[0] == ckpt_dir:
                self.uploader.offer(self.resume_from[1].step)  # a copy an earlier run did not finish (or begin)
        if self.resume_from is not None and (other := self.resume_from[1].meta.phase) != name:
            raise CheckpointError(
                f"{ckpt_dir} holds {other} checkpoints, not {name}'s: pick this phase's own --checkpoint_dir"
            )
        self.saver.run_id = self.run_id
        self.times.found = time.perf_counter()

    @property
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def build(self, model_cfg: GPTConfig, init: Callable[[GPT], None]) -> GPT:
        """The model, allocated on the device; `init` fills it unless a resume will load it anyway."""
        if self.resume_from is not None:
            # before anything big is built
            resume.check_compatible(self.resume_from[1].meta, model_cfg, asdict(self.cfg), self.ckpt_dir)
        with torch.device(self.device):
            model = GPT(model_cfg)
        model.to(self.device)  # the rotary tables are made on the CPU
        if self.resume_from is None:
            init(model)
        self.times.model = time.perf_counter()
        print0(
            f"model: {model_cfg}\nparameters: {model.num_params():,} | FLOPs per token: {model.flops_per_token():.3e}"
        )
        # a final or signal save keeps the other ranks waiting in a collective: at a slow 100 MB/s, does it fit?
        state_bytes = 3 * 4 * model.num_params()  # fp32 weights + at most two optimizer moments each
        if self.dist.is_distributed and state_bytes / 100e6 > self.cfg.dist_timeout / 2:
            warn0(
                f"a checkpoint of ~{state_bytes / 1e9:.1f} GB may take longer to write than half of --dist_timeout="
                f"{self.cfg.dist_timeout}s on slow storage; raise --dist_timeout (and the supervisor's --grace-period)"
            )
        return model

    def plan(self, tokens_per_row: int, derived_iterations: Callable[[int], int], rows_per_step: int = 0,
             eval_steps: int = 0) -> Plan:  # fmt: skip
        """Batch geometry (tokens_per_row: the tokens of one sequence) and the horizon: --num_iterations if set,
        else derived_iterations(tokens per step). A step is --total_batch_size tokens, or `rows_per_step` rows
        when the phase counts its own (RL: prompts x samples; it then gives `eval_steps` and says the plan itself)."""
        cfg, world = self.cfg, self.dist.world_size
        per_micro = cfg.device_batch_size * tokens_per_row * world
        total = per_micro if cfg.total_batch_size == -1 else cfg.total_batch_size
        if rows_per_step:  # the phase's own count decides; a total is only checked against it (the supervisor
            # pins the heartbeat's total on an OOM restart, so the same number must still be accepted)
            if cfg.total_batch_size not in (-1, rows_per_step * tokens_per_row):
                raise ConfigError(
                    f"--total_batch_size={cfg.total_batch_size} does not apply here: a step is {rows_per_step} rows of"
                    f" {tokens_per_row} tokens = {rows_per_step * tokens_per_row}; leave it at -1"
                )
            total = rows_per_step * tokens_per_row
        if total % per_micro:
            raise ConfigError(
                f"--total_batch_size={total} is not a multiple of device_batch_size*max_seq_len*world_size"
                f" = {cfg.device_batch_size}*{tokens_per_row}*{world} = {per_micro}; pick a multiple (or -1)"
            )
        iterations = cfg.num_iterations if cfg.num_iterations > 0 else max(1, derived_iterations(total))
        plan = Plan(iterations, tokens_per_row, total // per_micro, total, eval_steps)
        if rows_per_step:
            return plan
        plan.eval_steps = max(1, eval_token_count(cfg.eval_tokens, cfg.eval_every, iterations, total) // per_micro)
        print0(f"batch: {total:,} tokens/step = {cfg.device_batch_size}x{tokens_per_row} x {world} ranks x"
               f" {plan.grad_accum} accumulation steps")  # fmt: skip
        print0(f"training for {iterations:,} steps = {iterations * total:,} tokens")
        print0(f"evaluation: {plan.eval_steps * per_micro:,} validation tokens ({plan.eval_steps} batches) per"
               " evaluation")  # fmt: skip
        return plan

    def train(self, recipe: Recipe) -> int:
        """Run the loop (`_train`), then wait for the last checkpoint's upload, if a --remote_dir is set (rank 0, up
        to --remote_flush_timeout): a finished or stopped run is in the bucket when the process ends. Returns the
        exit status: 0 done, 128+signal stopped."""
        code = self._train(recipe)
        if self.uploader is not None and self.uploader.offered is not None:
            beat = self.telemetry.heartbeat if self.telemetry is not None else None
            up = self.uploader
            waiting = (lambda: beat.amend(**up.status(), **up.progress())) if beat else (lambda: None)  # noqa: E731
            if self.uploader.flush(self.cfg.remote_flush_timeout, waiting):  # the supervisor's deadline: its progress
                print0(f"remote: step {self.uploader.uploaded} is in {self.uploader.remote.url}")
            else:
                why = self.uploader.error or "still uploading"
                warn0(f"remote: step {self.uploader.offered} is not in {self.uploader.remote.url} after"
                      f" --remote_flush_timeout={self.cfg.remote_flush_timeout}s ({why}); it is safe locally, and"
                      " `nanochat-run push` copies it later")  # fmt: skip
        if self.telemetry is not None:  # the supervisor's summary shows how far the remote lags, and where time went
            remote = {**self.uploader.status(), "uploading": None} if self.uploader is not None else {}  # (done)
            self.telemetry.closing(**remote)
        return code

    def _train(self, r: Recipe) -> int:
        """Resume the state (weights, optimizer, loader position, RNG, counters) if a checkpoint was found, then
        train to `plan.num_iterations`: every step saves what it owes (train_loop.SaveSchedule), evaluates every
        --eval_every steps and at the end, and stops cleanly on a signal."""
        cfg, plan, stop, saver = self.cfg, r.plan, self.stop, self.saver
        train_model = torch.compile(r.model, dynamic=False) if _compile(cfg, self.device) else r.model
        self.times.optim = time.perf_counter()
        c = Counters() if self.resume_from is None else resume.restore(
            self.resume_from, self.ckpt_dir, cfg, plan, r.metric, r.meta.get("tokenizer"), r.model, r.optimizers,
            r.loader, self.dist, cfg.resume_exact)  # fmt: skip
        self.times.loaded = time.perf_counter()
        resumed = self.resume_from is not None
        self.guard, self.params = Guard(self.dist, cfg.spike_window, cfg.spike_z), list(r.model.parameters())
        tel = self.telemetry = Telemetry(cfg, self.dist, plan, r.metric, saver, self.ckpt_dir, c.step, resumed,
                                         r.model.flops_per_token(), self.uploader)  # fmt: skip
        if c.step >= plan.num_iterations:  # the final checkpoint: evaluate it if a stop cut its evaluation short
            if c.val_step == c.step:
                print0(
                    f"nothing to do: the final checkpoint at step {c.step} reaches num_iterations={plan.num_iterations}"
                )
            elif not self.final_eval(r, c):
                return stopped(stop, stop.decided, c.step, FINAL_EVAL_STOPPED)
            return self.finished(c)

        # `c.step` counts completed optimizer steps. Order within a step: train, log, save, then eval and samples, so
        # a crash in eval never costs the checkpoint and a resumed run (which starts at the next step) does not
        # repeat the eval of its first step.
        schedule, first_step = SaveSchedule.of(cfg.save_every, cfg.snapshot_every, cfg.mtbf, c.step), c.step
        skips = dict(parse_skips(cfg.skip_data))  # --skip_data: {first step: last step} whose data is skipped
        while c.step < plan.num_iterations:
            if last_skipped := skips.get(c.step + 1):
                self.skip_data(r, c, c.step + 1, last_skipped, "asked (--skip_data)")
            loss, lrm, dt, verdict = self.train_step(r, train_model, c)
            c.step += 1
            if c.step > first_step + 1:  # the first step of a process includes compilation and warm-up
                c.train_time += dt
            else:  # where a (re)start spends its time, for scripts/bench_recovery.py and the curious
                tel.startup(self.times)
            if verdict.kind != "ok" and (back := self.bad_numbers(r, c, verdict)) is not None:
                c, schedule = back, SaveSchedule.of(cfg.save_every, cfg.snapshot_every, cfg.mtbf, back.step)
                continue  # rolled back to the newest checkpoint, the data up to here skipped
            if math.isfinite(loss):  # (not a step whose update --on_nan=warn skipped)
                c.add_loss(loss)
            tel.step(c, lrm, dt, r.step_stats, saver.durable)
            if self.fault:
                self.fault.at_step(c.step, self.dist.rank)

            vote = schedule.vote(c.step, dt, saver.records, saver.busy()) if self.dist.master else 0
            last, (signum, save_now) = c.step == plan.num_iterations, stop.agreed_with(self.dist, vote)
            if due := schedule.due(c.step, last, signum, save_now):
                self.save(r, c, due)
            if signum and not last:
                return stopped(stop, signum, c.step)
            if last:
                if saver.snapshotter:
                    snapshots.remove(self.ckpt_dir)  # the final checkpoint is durable: free the shared memory
                if not self.final_eval(r, c):
                    return stopped(stop, stop.decided, c.step, FINAL_EVAL_STOPPED)
            elif cfg.eval_every > 0 and c.step % cfg.eval_every == 0:
                if (result := self.run_eval(r, c.step)) is None:  # stopped mid-evaluation: make this step durable
                    if schedule.on_disk(c.step):
                        saver.finish()  # saved just before the evaluation (perhaps still in the background)
                    else:
                        self.save(r, c, schedule.due(c.step, signum=stop.decided))
                    return stopped(stop, stop.decided, c.step)
                c.val, c.val_step = result, c.step
            if r.sample_every > 0 and (last or c.step % r.sample_every == 0):
                with tel.spending("eval"):
                    r.sample(c.step)

        saver.finish()  # nothing should be in flight after the final save; this makes sure
        crc = check_replicas(r.model, self.dist)
        print0(f"weights identical on all {self.dist.world_size} ranks (CRC32 {crc})")
        tel.done(c)
        return self.finished(c)

    def train_step(self, r: Recipe, train_model: torch.nn.Module, c: Counters) -> tuple[float, float, float, Verdict]:
        """One optimizer step after `c.step` completed ones: (the last micro-batch's loss on this rank, a cheap and
        honest progress signal; the LR multiplier; the seconds it took; the ranks' verdict on its numbers). The
        update is applied only when the numbers are sound, or a spike is only to be warned about (guard.py)."""
        cfg, cuda, batches = self.cfg, self.device.type == "cuda", []
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        rng = torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if cuda else None
        loss, verdict = self._gradients(r, train_model, c, batches)
        if verdict.kind == "nan":  # once more from the same state: the same batches, the RNG as the step began
            print0(f"step {c.step + 1} | non-finite loss or gradient on rank(s) {verdict.ranks}: rerunning the step")
            r.optimizers.zero_grad()
            torch.set_rng_state(rng[0])
            if cuda:
                torch.cuda.set_rng_state(rng[1], self.device)
            loss, again = self._gradients(r, train_model, c, batches)
            if again.kind != "nan":
                raise self.guard.suspect(c.step + 1, verdict.ranks)
        lrm = c.lrm(lr_multiplier(c.step, r.plan.num_iterations, cfg.warmup_ratio, cfg.warmdown_ratio,
                                  cfg.final_lr_frac))  # fmt: skip
        if verdict.kind == "ok" or verdict.kind == "spike" and cfg.on_spike == "warn":
            r.optimizers.step(lrm, muon_momentum(c.step))
        r.optimizers.zero_grad()
        self.saver.settle()  # the snapshot of the step before, written during this one, is committed
        if cuda:
            torch.cuda.synchronize()
        return loss, lrm, time.perf_counter() - t0, verdict

    def _gradients(self, r: Recipe, train_model: torch.nn.Module, c: Counters, batches: list) -> tuple[float, Verdict]:
        """Forward and backward over the step's micro-batches (fetched into `batches`, or those given again), then
        the ranks' verdict on the numbers. Returns the last micro-batch's loss on this rank."""
        total, rerun = 0.0, bool(batches)
        for i in range(r.plan.grad_accum):
            # Fetched here, not prefetched across the step boundary, so the loader's position after a step is
            # exactly "everything this step consumed" (what a checkpoint records). On CUDA the fetch still
            # overlaps the previous micro-batch's queued backward.
            if not rerun:
                batches.append(r.loader.next_batch())
            with self.autocast:
                loss = r.loss(train_model, batches[i])
            if self.fault:
                loss = self.fault.at_loss(loss, c.step + 1, self.dist.rank, rerun)
            (loss / r.plan.grad_accum).backward()
            total = total + loss.detach()
        return loss.item(), self.guard.check(total / r.plan.grad_accum, self.params, c.loss_window)

    def bad_numbers(self, r: Recipe, c: Counters, verdict: Verdict) -> Counters | None:
        """Step `c.step` had a non-finite value or a spike (the update was not applied, except a spike under
        --on_spike=warn): warn, or roll back (guard.py). Returns the counters rolled back to, or None to go on."""
        cfg, step = self.cfg, c.step
        nan = verdict.kind == "nan"
        what = "a non-finite loss or gradient, again on the rerun"
        if not nan:
            what = f"a loss spike: {verdict.loss:.4f}, {verdict.z:.1f} sd above the last {cfg.spike_window} steps"
        if (cfg.on_nan if nan else cfg.on_spike) == "warn":
            action = "update skipped" if nan else "applied"
            warn0(f"step {step}: {what}; {action} (--on_{verdict.kind}=warn)")
            c.rollbacks = [*c.rollbacks, {"at": step, "reason": verdict.kind, "action": action}]
            self.telemetry.log.anomaly(step, reason=verdict.kind, action=action)
            if self.fault:
                self.fault.settled()
            return None
        self.saver.finish()  # nothing in flight: the checkpoint to go back to is committed
        if (done := sum("skipped" in x and x["reason"] in ("nan", "spike") for x in c.rollbacks)) >= cfg.max_rollbacks:
            raise Diverged(
                f"step {step}: {what}, after {done} rollbacks (--max_rollbacks={cfg.max_rollbacks}): the run"
                " diverges; lower the learning rates or check the data"
            )
        point, _ = find_start(self.ckpt_dir, True, self.dist, self.machines, self.saver.verified)
        if point is None:
            warn0(f"step {step}: {what}; no checkpoint to go back to yet: its update was skipped")
            return None
        back = resume.restore(point, self.ckpt_dir, cfg, r.plan, r.metric, r.meta.get("tokenizer"), r.model,
                              r.optimizers, r.loader, self.dist)  # fmt: skip
        back.rollbacks = c.rollbacks  # this run's, newer than the checkpoint's
        warn0(f"step {step}: {what}; rolled back to step {back.step} (rollback {done + 1} of at most"
              f" {cfg.max_rollbacks})")  # fmt: skip
        self.skip_data(r, back, back.step + 1, step, verdict.kind)
        self.telemetry.rolled_back(back.step, at=step, reason=verdict.kind)
        if self.fault:
            self.fault.settled()
        return back

    def skip_data(self, r: Recipe, c: Counters, first: int, last: int, reason: str) -> None:
        """Read past the data of steps first..last (what they would train on), and record it."""
        for _ in range((last - first + 1) * r.plan.grad_accum):
            r.loader.next_batch()
        c.rollbacks = [*c.rollbacks, {"skipped": [first, last], "reason": reason}]
        print0(f"skipped the data of steps {first}-{last} ({reason})")

    def save(self, r: Recipe, c: Counters, due: Due) -> None:
        """Save step `c.step` as `due` says; a final or signal save is durable before this returns."""
        with self.telemetry.spending("save" if due.reason == "periodic" else "final"):
            self._save(r, c, due)

    def _save(self, r: Recipe, c: Counters, due: Due) -> None:
        self.telemetry.saving(c.step, due)
        t0 = time.perf_counter()
        record = meta_record(c, extras=r.meta, run_id=self.run_id, phase=self.name,
                             num_iterations=r.plan.num_iterations, tokens_per_step=r.plan.tokens_per_step,
                             reason=due.reason, model_config=r.model.config.to_dict(), train_config=asdict(self.cfg),
                             world_size=self.dist.world_size, metric=r.metric,
                             started_at=self.telemetry.started_at)  # fmt: skip
        rank_state = {"loader": r.loader.state_dict(), "rng": rng_state(self.device)}
        background = due.reason == "periodic"
        self.saver.save(c.step, r.model.state_dict(), r.optimizers.state_dict(), record, rank_state,
                        wait=not background, disk=due.disk, memory=due.memory)  # fmt: skip
        self.telemetry.saved(c.step, due, time.perf_counter() - t0, background and self.cfg.async_save)

    def run_eval(self, r: Recipe, step: int) -> float | None:
        """The evaluation's metric, or None if a stop signal arrived meanwhile (the ranks agree on it after every
        batch, so a Ctrl+C ends even a long evaluation within a batch). Progress goes into the heartbeat."""

        def between(done: int, exhausted: bool) -> tuple[bool, bool]:
            if self.fault and done:
                self.fault.at_eval_batch(self.dist.rank)
            self.telemetry.evaluating(step, done, self.saver.durable)
            signum, ended = self.stop.agreed_with(self.dist, int(exhausted))
            return bool(signum), bool(ended)

        with self.telemetry.spending("eval"):
            between(0, False)
            r.model.eval()
            with self.autocast:
                result = r.evaluate(step, between)
            r.model.train()
        self.telemetry.evaluated(step, result)
        return result

    def final_eval(self, r: Recipe, c: Counters) -> bool:
        """Evaluate the final checkpoint (already durable) and add the metric to its meta; False if stopped."""
        result = self.run_eval(r, c.step)
        if result is None:
            return False
        c.val, c.val_step = result, c.step
        if self.saver.writer:
            try:  # a nicety on a checkpoint that is already durable: never a reason to fail the run
                checkpoint.update_meta(self.ckpt_dir, c.step, **{r.metric: c.val, f"{r.metric}_step": c.step})
            except OSError as e:
                self.saver.warn(f"could not add the final {self.telemetry.label} to {self.ckpt_dir}'s meta"
                                f" ({e.strerror or e}); it is in the log")  # fmt: skip
        return True

    def finished(self, c: Counters) -> int:
        self.telemetry.finished(c)
        cleanup_distributed()
        return 0


def _compile(cfg: LoopConfig, device: torch.device) -> bool:
    return cfg.compiles(device.type == "cuda")
