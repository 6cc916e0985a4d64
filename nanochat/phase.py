"""One training phase (base training, midtraining, SFT, RL): the settings they all share, the start (process
group, stop flag, the checkpoint directory held, where the run resumes from), the exact resume of weights,
optimizer, data position and RNG, and the training loop itself.

A phase script builds only what is its own (where the model comes from, its data, its evaluation, its horizon) and
hands them to `Phase.train`. Saving, resuming, stopping on a signal, the heartbeat and the order of save and eval
exist once: here, in train_loop.py, saver.py and checkpoint/.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import psutil
import torch

from nanochat import checkpoint, metrics, node_dirs, resume
from nanochat.checkpoint import CheckpointError, snapshots
from nanochat.common import cleanup_distributed, init_distributed, keep_freed_memory, print0, say_here, warn0, warn_here
from nanochat.config import ConfigError, describe
from nanochat.faults import Fault
from nanochat.gpt import GPT, GPTConfig
from nanochat.loss_eval import eval_token_count
from nanochat.optim import Optimizers, lr_multiplier, muon_momentum
from nanochat.redact import redact, reveal
from nanochat.remote import Uploader, check_remote, restore_if_newer
from nanochat.saver import Saver
from nanochat.settings import LoopConfig
from nanochat.train_loop import (
    Heartbeat,
    SaveSchedule,
    StopFlag,
    check_replicas,
    find_start,
    peak_flops,
    rng_state,
    set_rng_state,
    stopped,
)


class Loader(Protocol):
    """What the loop needs of a phase's training data: batches, and a position a checkpoint can hold."""

    def next_batch(self) -> tuple[torch.Tensor, ...]: ...  # (inputs, targets) unless the phase has its own loss_fn
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
    eval_steps: int  # micro-batches per evaluation on each rank


Evaluate = Callable[[int, Callable[[int, bool], tuple[bool, bool]]], float | None]


class Phase:
    """A phase's run: `Phase(...)` starts it (the directory held, the resume point found), the script builds its
    model, optimizer and data, and `train(...)` resumes their state and runs the loop to the budget or a stop."""

    def __init__(self, name: str, cfg: LoopConfig, ckpt_dir: Path, overrides: dict) -> None:
        self.t0 = time.perf_counter()
        self.imported = time.time() - psutil.Process().create_time()  # the interpreter's start-up and our imports
        self.name, self.cfg, self.ckpt_dir, self.overrides = name, cfg, ckpt_dir, overrides
        # the real URL only opens the filesystem; the config (logged, and recorded in every meta) keeps it redacted
        self.remote_url = reveal(cfg.remote_dir) if cfg.remote_dir else ""
        cfg.remote_dir = redact(cfg.remote_dir)
        self.dist = init_distributed(cfg.device_type, cfg.dist_timeout)
        self.t_pg = time.perf_counter()
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
        machines = self.dist.world_size // int(os.environ.get("LOCAL_WORLD_SIZE", self.dist.world_size))
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
        self.uploader, self.heartbeat = None, None
        if remote and self.dist.master:
            keep = cfg.remote_keep_last_n or cfg.keep_last_n_checkpoints
            at_upload = self.fault.at_upload if self.fault else (lambda phase: None)
            # say_here: one write per line, as the uploader's thread prints between the training thread's lines
            self.uploader = Uploader(remote, ckpt_dir, keep, warn0, say_here, at_upload, self.run_id, cfg.keep_every)
            self.saver.on_durable = self.uploader.offer
            if self.resume_from is not None and self.resume_from[0] == ckpt_dir:
                self.uploader.offer(self.resume_from[1].step)  # a copy an earlier run did not finish (or begin)
        if self.resume_from is not None and (other := self.resume_from[1].meta.get("phase", "base_train")) != name:
            raise CheckpointError(
                f"{ckpt_dir} holds {other} checkpoints, not {name}'s: pick this phase's own --checkpoint_dir"
            )
        self.saver.run_id = self.run_id
        self.t_found = time.perf_counter()

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
        self.t_model = time.perf_counter()
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

    def plan(self, tokens_per_row: int, derived_iterations: Callable[[int], int]) -> Plan:
        """Batch geometry (tokens_per_row: the tokens of one sequence) and the horizon: --num_iterations if set,
        else derived_iterations(tokens per step)."""
        cfg, world = self.cfg, self.dist.world_size
        per_micro = cfg.device_batch_size * tokens_per_row * world
        total = per_micro if cfg.total_batch_size == -1 else cfg.total_batch_size
        if total % per_micro:
            raise ConfigError(
                f"--total_batch_size={total} is not a multiple of device_batch_size*max_seq_len*world_size"
                f" = {cfg.device_batch_size}*{tokens_per_row}*{world} = {per_micro}; pick a multiple (or -1)"
            )
        iterations = cfg.num_iterations if cfg.num_iterations > 0 else max(1, derived_iterations(total))
        eval_steps = max(1, eval_token_count(cfg.eval_tokens, cfg.eval_every, iterations, total) // per_micro)
        print0(f"batch: {total:,} tokens/step = {cfg.device_batch_size}x{tokens_per_row} x {world} ranks x"
               f" {total // per_micro} accumulation steps")  # fmt: skip
        print0(f"training for {iterations:,} steps = {iterations * total:,} tokens")
        print0(f"evaluation: {eval_steps * per_micro:,} validation tokens ({eval_steps} batches) per evaluation")
        return Plan(iterations, tokens_per_row, total // per_micro, total, eval_steps)

    def train(self, *args, **kwargs) -> int:
        """Run `_train` (below), then wait for the last checkpoint's upload, if a --remote_dir is set (rank 0, up to
        --remote_flush_timeout): a finished or stopped run is in the bucket when the process ends."""
        code = self._train(*args, **kwargs)
        if self.uploader is not None and self.uploader.offered is not None:
            if self.uploader.flush(self.cfg.remote_flush_timeout):
                print0(f"remote: step {self.uploader.uploaded} is in {self.uploader.remote.url}")
            else:
                why = self.uploader.error or "still uploading"
                warn0(f"remote: step {self.uploader.offered} is not in {self.uploader.remote.url} after"
                      f" --remote_flush_timeout={self.cfg.remote_flush_timeout}s ({why}); it is safe locally, and"
                      " `nanochat-run push` copies it later")  # fmt: skip
            if self.heartbeat is not None:  # the supervisor's end-of-run summary shows how far the remote lags
                self.heartbeat.amend(**self.uploader.status())
        return code

    def _train(
        self,
        model: GPT,
        optimizers: Optimizers,
        loader: Loader,
        plan: Plan,
        evaluate: Evaluate,
        meta: dict,
        sample: Callable[[int], None] | None = None,
        sample_every: int = -1,
        loss_fn: Callable[[torch.nn.Module, tuple], torch.Tensor] | None = None,
        metric: str = "val_bpb",
        step_stats: Callable[[], dict[str, float]] | None = None,
    ) -> int:
        """Resume the state (weights, optimizer, loader position, RNG, counters) if a checkpoint was found, then
        train to `plan.num_iterations`: every step saves what it owes (train_loop.SaveSchedule), evaluates every
        --eval_every steps and at the end, and stops cleanly on a signal. `evaluate(step, between)` returns the
        metric or None when `between` reported a stop; `meta` goes into every checkpoint's meta.

        A micro-batch is `loss_fn(train_model, loader.next_batch())` (default: train_model(x, y), the next-token
        loss); `metric` names the evaluation's number in the meta (with its step as `<metric>_step`), the logs
        and the heartbeat; `step_stats()`, called by every rank at each step line, adds numbers to it."""
        loss_fn = loss_fn or (lambda m, batch: m(*batch))
        label = metric.removeprefix("val_").replace("_", " ")
        cfg, dist_info, device, ckpt_dir = self.cfg, self.dist, self.device, self.ckpt_dir
        world, stop, saver, fault = dist_info.world_size, self.stop, self.saver, self.fault
        num_iterations, total_batch = plan.num_iterations, plan.tokens_per_step
        train_model = torch.compile(model, dynamic=False) if _compile(cfg, device) else model
        flops_per_token, peak = model.flops_per_token(), peak_flops(device)
        t_optim = time.perf_counter()

        # ---- resume: weights, optimizer, schedule position, data position, RNG ---------------------------------
        step, smooth_loss, train_time, val, val_step = 0, 0.0, 0.0, None, None
        history, extended, tokens_seen = [], None, 0  # tokens_seen: tokens before the current batch size took over
        if self.resume_from is not None:
            source, ckpt = self.resume_from
            if source != ckpt_dir:
                print0(f"resume: the in-memory snapshot at step {ckpt.step} ({source}) is newer than any checkpoint")
            saved = ckpt.meta
            resume.check_tokenizer(saved, meta.get("tokenizer"), ckpt_dir)
            for change in (changed := resume.changes(saved["train_config"], asdict(cfg))):
                print0(f"resume: --{change['setting']} changed from {change['from']!r} to {change['to']!r}")
            history = saved.get("changed_on_resume", []) + [{"step": saved["step"], **c} for c in changed]
            extended = resume.extension(saved, ckpt.final, num_iterations, cfg.rewarm_steps)
            if extended and extended.step == saved["step"]:
                ramp = f"ramps up over --rewarm_steps={extended.rewarm}" if extended.rewarm else "goes back at once"
                was = f"the LR multiplier was {extended.from_lrm:.2f}; it {ramp}"
                print0(f"resume: the run had finished at step {saved['step']}; it goes on to {num_iterations} under"
                       f" the new budget's schedule ({was})")  # fmt: skip
            tokens_seen = saved.get("tokens_seen", saved["step"] * total_batch) - saved["step"] * total_batch
            model_state, optim_state = checkpoint.load(source, ckpt, device, model)
            model.load_state_dict(model_state)
            if optim_state is None:  # every newer checkpoint was damaged: the fallback is a weights-only one
                warn0(f"resuming from the weights-only checkpoint at step {ckpt.step}: the optimizer state (Adam"
                      " moments, Muon momentum) starts afresh, so this resume is not exact")  # fmt: skip
            else:
                optimizers.load_state_dict(optim_state)
            del model_state, optim_state
            step, smooth_loss, train_time = saved["step"], saved["smooth_loss"], saved["train_time"]
            val, val_step = saved.get(metric), saved.get(f"{metric}_step")
            ranks = saved["ranks"]
            try:
                if len(ranks) == world:  # the loader position is in tokens: a changed batch size continues exactly
                    loader.load_state_dict(ranks[dist_info.rank]["loader"])
                else:
                    loader.load_resharded([r["loader"] for r in ranks])
            except (ValueError, KeyError) as e:
                raise CheckpointError(
                    f"the checkpoint at step {step} in {ckpt_dir} was saved with other data settings ({e}); restore"
                    " them (e.g. --tasks, --task_size, --seed) or start fresh with --resume=False"
                ) from None
            if len(ranks) == world:
                set_rng_state(ranks[dist_info.rank]["rng"], device)
                print0(f"resumed from step {step} in {ckpt_dir}")
            else:
                print0(
                    f"resumed from step {step} in {ckpt_dir} at a new geometry ({len(ranks)} -> {world} ranks):"
                    " weights, optimizer and schedule are exact; the data order continues approximately"
                )
            if step >= num_iterations and not ckpt.final:  # the budget was lowered below where the run is
                raise CheckpointError(
                    f"the checkpoint at step {step} in {ckpt_dir} is already at or past --num_iterations="
                    f"{num_iterations} but is not a final one; raise --num_iterations to go on, or --resume=False"
                    " to start fresh"
                )
        t_loaded = time.perf_counter()

        wandb_run = metrics.setup_wandb(cfg.run, asdict(cfg), dist_info.master, warn0)
        log = metrics.MetricsLog(ckpt_dir, saver.writer, step, saver.warn)  # a dir per node: each its own history
        started_at = time.time()
        # every node's supervisor watches its own node: each node's local rank 0 beats
        heartbeat = self.heartbeat = Heartbeat(cfg.heartbeat_file, dist_info.local_rank == 0,
                                               num_iterations=num_iterations, device_batch_size=cfg.device_batch_size,
                                               total_batch_size=total_batch, max_seq_len=plan.seq_len,
                                               world_size=world, device=device.type,
                                               dist_timeout=cfg.dist_timeout)  # fmt: skip
        heartbeat(step=step, phase="starting", checkpoint=step if self.resume_from else None)

        def save(step: int, reason: str, disk: bool = True, memory: bool = False) -> None:
            heartbeat(step=step, phase="saving", reason=reason)
            t0 = time.perf_counter()
            record = {
                **meta,
                "run_id": self.run_id,
                "phase": self.name,
                "num_iterations": num_iterations,
                "final": step == num_iterations,
                "stop_reason": reason,
                "model_config": model.config.to_dict(),
                "train_config": asdict(cfg),
                "world_size": world,
                "total_batch_size": total_batch,
                "tokens_seen": tokens_seen + step * total_batch,
                "changed_on_resume": history,
                "schedule_extended": resume.record(extended),
                metric: val,
                f"{metric}_step": val_step,
                "train_loss": smooth_loss / (1 - 0.9**step) if step else None,
                "smooth_loss": smooth_loss,
                "train_time": train_time,
                "started_at": started_at,
                "torch_version": torch.__version__,
            }
            rank_state = {"loader": loader.state_dict(), "rng": rng_state(device)}
            background = reason == "periodic"  # final and signal saves are durable before we go on
            saver.save(step, model.state_dict(), optimizers.state_dict(), record, rank_state, wait=not background,
                       disk=disk, memory=memory)  # fmt: skip
            dt = time.perf_counter() - t0
            what = " and ".join(
                [f"checkpoint to {ckpt_dir} ({reason})"] * disk + ["snapshot in shared memory"] * memory
            )
            if background and cfg.async_save:
                print0(f"step {step:05d} | saving {what} in the background; blocked {dt:.3f}s")
            else:
                print0(f"step {step:05d} | saved {what} in {dt:.2f}s")

        def run_eval(step: int) -> float | None:
            """The evaluation's metric, or None if a stop signal arrived meanwhile (the ranks agree on it after every
            batch, so a Ctrl+C ends even a long evaluation within a batch). Progress goes into the heartbeat."""

            def between(done: int, exhausted: bool) -> tuple[bool, bool]:
                if fault and done:
                    fault.at_eval_batch(dist_info.rank)
                heartbeat(step=step, phase="evaluating", eval_batch=done, eval_batches=plan.eval_steps,
                          checkpoint=saver.durable)  # fmt: skip
                signum, ended = stop.agreed_with(dist_info, int(exhausted))
                return bool(signum), bool(ended)

            between(0, False)
            model.eval()
            with self.autocast:
                result = evaluate(step, between)
            model.train()
            if result is None:
                print0(f"step {step:05d} | validation stopped by a signal")
                return None
            print0(f"step {step:05d} | validation {label} {result:.4f}")
            log.eval(step, **{metric: result})
            if wandb_run:
                wandb_run.log({"step": step, f"val/{label}": result})
            return result

        def final_eval(step: int) -> bool:
            """Evaluate the final checkpoint (already durable) and add the metric to its meta; False if stopped."""
            nonlocal val, val_step
            result = run_eval(step)
            if result is None:
                return False
            val, val_step = result, step
            if saver.writer:
                try:  # a nicety on a checkpoint that is already durable: never a reason to fail the run
                    checkpoint.update_meta(ckpt_dir, step, **{metric: val, f"{metric}_step": step})
                except OSError as e:
                    saver.warn(f"could not add the final {label} to {ckpt_dir}'s meta ({e.strerror or e}); it is in"
                               " the log")  # fmt: skip
            return True

        def finished(step: int) -> int:
            heartbeat(step=step, phase="done", loss=smooth_loss / (1 - 0.9**step), checkpoint=step, **{metric: val})
            cleanup_distributed()
            return 0

        if step >= num_iterations:  # the final checkpoint: evaluate it if a stop cut its evaluation short
            if val_step == step:
                print0(f"nothing to do: the final checkpoint at step {step} reaches num_iterations={num_iterations}")
            elif not final_eval(step):
                return stopped(stop, stop.decided, step, " in the final evaluation; run again to evaluate it")
            return finished(step)

        # ---- the loop: `step` counts completed optimizer steps ---------------------------------------------------
        # Order within a step: train, log, save, then eval and samples, so a crash in eval never costs the
        # checkpoint and a resumed run (which starts at the next step) does not repeat the eval of its first step.
        first_step, smooth_tps, timed = step, 0.0, 0
        schedule = SaveSchedule(cfg.save_every, cfg.snapshot_every)
        while step < num_iterations:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(plan.grad_accum):
                # Fetched here, not prefetched across the step boundary, so the loader's position after a step is
                # exactly "everything this step consumed" (what a checkpoint records). On CUDA the fetch still
                # overlaps the previous micro-batch's queued backward.
                batch = loader.next_batch()
                with self.autocast:
                    loss = loss_fn(train_model, batch)
                (loss / plan.grad_accum).backward()
            lrm = lr_multiplier(step, num_iterations, cfg.warmup_ratio, cfg.warmdown_ratio, cfg.final_lr_frac)
            lrm = extended.lrm(step, lrm) if extended else lrm
            optimizers.step(lrm, muon_momentum(step))
            optimizers.zero_grad()
            saver.settle()  # the snapshot of the step before, written during this one, is committed
            loss_value = loss.item()  # the last micro-batch's loss on this rank: a cheap, honest progress signal
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            step += 1
            if step > first_step + 1:  # the first step of a process includes compilation and warm-up
                train_time += dt
            else:  # where a (re)start spends its time, for scripts/bench_recovery.py and the curious
                now = time.perf_counter()
                print0(
                    f"startup: {self.imported:.2f}s interpreter + imports, {self.t_pg - self.t0:.2f}s process group,"
                    f" {self.t_found - self.t_pg:.2f}s finding the checkpoint, {self.t_model - self.t_found:.2f}s"
                    f" building the model, {t_optim - self.t_model:.2f}s optimizers and data, {t_loaded - t_optim:.2f}s"
                    f" loading the state, {now - t_loaded:.2f}s first step; {self.imported + now - self.t0:.2f}s in all"
                )
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"loss is {loss_value} at step {step}; lower the learning rates or check the data"
                )

            smooth_loss = 0.9 * smooth_loss + 0.1 * loss_value
            debiased = smooth_loss / (1 - 0.9**step)
            tok_per_s = total_batch / dt
            if step > first_step + 1:  # the smoothed rate leaves out the first step (compilation, warm-up)
                timed += 1
                smooth_tps = 0.9 * smooth_tps + 0.1 * tok_per_s
            mfu_now = 100 * flops_per_token * tok_per_s / (peak * world) if peak else None
            remote = self.uploader.status() if self.uploader else {}
            heartbeat(step=step, loss=debiased, tok_per_s=smooth_tps / (1 - 0.9**timed) if timed else None, **remote,
                      mfu=mfu_now, gpu_mem=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                      checkpoint=saver.durable, phase="training")  # fmt: skip
            stats = {}
            if step % cfg.log_every == 0 or step == num_iterations:
                mfu = f" | mfu {mfu_now:.1f}%" if peak else ""
                stats = step_stats() if step_stats else {}
                print0(
                    f"step {step:05d}/{num_iterations:05d} ({100 * step / num_iterations:.1f}%) | loss {debiased:.4f}"
                    + "".join(f" | {k.replace('_', ' ')} {v:.4f}" for k, v in stats.items())
                    + f" | lrm {lrm:.2f} | dt {dt * 1000:.0f}ms | tok/s {tok_per_s:,.0f}{mfu}"
                    f" | total time {train_time / 60:.2f}m"
                )
                if wandb_run:
                    wandb_run.log(
                        {
                            "step": step,
                            "train/loss": debiased,
                            "train/lrm": lrm,
                            "train/tok_per_sec": tok_per_s,
                            **{f"train/{k}": v for k, v in stats.items()},
                        }
                    )
            log.step(step, loss=debiased, lrm=lrm, tok_per_s=tok_per_s, mfu=mfu_now, dt=dt, **stats)
            if fault:
                fault.at_step(step, dist_info.rank)

            last = step == num_iterations
            signum = stop.agreed(dist_info)
            if due := schedule.due(step, last, signum):
                save(step, due.reason, disk=due.disk, memory=due.memory)
            if signum and not last:
                return stopped(stop, signum, step)
            if last and saver.snapshotter:
                snapshots.remove(ckpt_dir)  # the final checkpoint is durable: free the shared memory (every machine)
            if last:
                if not final_eval(step):
                    return stopped(stop, stop.decided, step, " in the final evaluation; run again to evaluate it")
            elif cfg.eval_every > 0 and step % cfg.eval_every == 0:
                if (result := run_eval(step)) is None:  # stopped mid-evaluation: make this step durable, then exit
                    if schedule.on_disk(step):
                        saver.finish()  # saved just before the evaluation (perhaps still in the background)
                    else:
                        save(step, f"signal:{signal.Signals(stop.decided).name}")
                    return stopped(stop, stop.decided, step)
                val, val_step = result, step
            if sample is not None and sample_every > 0 and (last or step % sample_every == 0):
                sample(step)

        saver.finish()  # nothing should be in flight after the final save; this makes sure
        crc = check_replicas(model, dist_info)
        print0(f"weights identical on all {world} ranks (CRC32 {crc})")
        print0(f"done: {step} steps, validation {label} {val:.4f}, training time {train_time / 60:.2f}m")
        if wandb_run:
            wandb_run.finish()
        return finished(step)


def _compile(cfg: LoopConfig, device: torch.device) -> bool:
    if cfg.compile.lower() == "auto":
        return device.type == "cuda"
    return cfg.compile.lower() in ("true", "1")
