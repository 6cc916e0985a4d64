"""The supervisor's vocabulary: run states, attempt classes, and the records that carry them."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field


class RunState(enum.Enum):
    """The life of one supervised run; `Agent._set_state` is the only place that changes it.

        STARTING --first heartbeat--> HEALTHY --torchrun exits--> (classify, then `decide`)
            |                            |                          |-- completed ----------> SUCCEEDED
            |  (exit, hang or startup    |                          |-- restart -> BACKOFF --> STARTING
            |   timeout: same path)      |                          '-- give up -----------> FAILED
            '----------------------------+--Ctrl+C / SIGTERM--> STOPPING --saved or grace over--> STOPPED

    BACKOFF also goes to STOPPED when a stop is requested while waiting. SUCCEEDED, FAILED and STOPPED are final.
    """

    STARTING = "starting"
    HEALTHY = "healthy"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"

    @property
    def running(self) -> bool:
        return self in (RunState.STARTING, RunState.HEALTHY)

    @property
    def final(self) -> bool:
        return self in (RunState.SUCCEEDED, RunState.FAILED, RunState.STOPPED)


class AttemptClass(enum.Enum):
    """How one attempt (one torchrun) ended. Exactly one per attempt."""

    COMPLETED = "completed"  # exit 0 with the step budget reached
    STOPPED = "stopped"  # we asked (Ctrl+C / SIGTERM) and the trainer saved and exited
    CRASH = "crash"  # a Python exception (read from the torchrun error file) or a plain non-zero exit
    HOST_OOM = "host_oom"  # a worker SIGKILLed by the kernel's OOM killer
    CUDA_OOM = "cuda_oom"  # torch.OutOfMemoryError in the error file
    HANG = "hang"  # no heartbeat progress for --hang-timeout (or --startup-timeout before the first step)
    SIGNAL = "signal"  # killed by some other signal
    NCCL_TIMEOUT = "nccl_timeout"  # a collective timed out (NCCL watchdog or gloo timeout)


@dataclass
class Outcome:
    """The classified end of an attempt, with the evidence that led to the class."""

    kind: AttemptClass
    message: str  # one line: exception type and message, the signal, or why we killed it
    exitcode: int | None = None  # torchrun's exit status (negative: killed by that signal)
    rank: int | None = None  # the root-cause rank, when known
    worker_exitcode: int | None = None  # the root-cause worker's exit status (negative: signal)
    error_file: str | None = None
    evidence: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**asdict(self), "kind": self.kind.value}


class Action(enum.Enum):
    FINISH = "finish"  # the budget is reached
    RESTART = "restart"
    STOP = "stop"  # the user asked us to stop
    GIVE_UP = "give_up"


@dataclass
class Decision:
    action: Action
    reason: str
    delay: float = 0.0  # seconds to wait before the restart
    trainer_overrides: dict[str, str] = field(default_factory=dict)  # e.g. {"device_batch_size": "8"}
