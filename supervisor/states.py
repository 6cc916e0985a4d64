"""The supervisor's vocabulary: run states, attempt classes, and the records that carry them."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field


class RunState(enum.Enum):
    """The life of one supervised run; `Lifecycle.set` (supervisor/lifecycle.py) is the only place that changes it.

        STARTING --first heartbeat--> HEALTHY --torchrun exits--> (reap, classify, then `decide`)
            |                            |                          |-- completed ----------> SUCCEEDED
            |  (exit, hang or startup    |                          |-- restart -> BACKOFF --> STARTING
            |   timeout: same path)      |                          '-- give up -----------> FAILED
            '----------------------------+--Ctrl+C / SIGTERM--> STOPPING --saved or grace over--> STOPPED

        STARTING --the node fails its health check (before torchrun; --health-check, supervisor/health.py)--> FAILED

    An attempt ends only when every process it started is gone: torchrun, its workers (even orphaned ones, which
    get the grace period to finish a save) and anything they started. BACKOFF also goes to STOPPED when a stop is
    requested while waiting; STARTING waits first for a previous trainer that still holds the trainer lock.
    SUCCEEDED, FAILED and STOPPED are final.
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
    """How one attempt (one torchrun) ended. Exactly one per attempt; `policy.decide` maps it to an action:

        COMPLETED ------------------------------------------------> finish
        STOPPED --------------------------------------------------> stop (exit 130 / 75)
        REFUSED --------------------------------------------------> give up at once (a restart cannot fix it)
        DIVERGED -------------------------------------------------> give up at once (rollbacks spent on bad numbers)
        UNHEALTHY (the node failed its health check; no torchrun) -> give up at once, naming the check (a restart
                                                                     on a sick machine only loops)
        CRASH, STORAGE, HOST_OOM, HANG, SIGNAL, NCCL_TIMEOUT -----> restart with backoff, resume
        PEER_FAILURE (multi-node: recorded by the nodes that did not fail first; the leader decides on the class
                      of the node that did: supervisor/nodes.py)
        CUDA_OOM -------------------------------------------------> restart with a smaller device batch
        (any restart) -- --max-restarts used up, or --max-no-progress attempts without a new checkpoint --> give up

    The backoff before a restart doubles with each attempt in a row that never reached training.
    """

    COMPLETED = "completed"  # exit 0 with the step budget reached
    STOPPED = "stopped"  # we asked (Ctrl+C / SIGTERM) and the trainer saved and exited
    REFUSED = "refused"  # trainer exit 2: bad settings or an incompatible checkpoint
    DIVERGED = "diverged"  # trainer exit 65: more rollbacks of NaNs or spikes than --max_rollbacks (guard.py)
    STORAGE = "storage"  # trainer exit 74, or a failure with no error file on a full filesystem
    CRASH = "crash"  # a Python exception (read from the torchrun error file) or a plain non-zero exit
    HOST_OOM = "host_oom"  # a process SIGKILLed by the kernel's OOM killer
    CUDA_OOM = "cuda_oom"  # torch.OutOfMemoryError in the error file
    HANG = "hang"  # no heartbeat progress within the hang deadline (--hang-timeout: auto, pace.py, or fixed)
    SIGNAL = "signal"  # killed by some other signal (a worker, or torchrun itself)
    NCCL_TIMEOUT = "nccl_timeout"  # a collective timed out (NCCL watchdog or gloo timeout)
    UNHEALTHY = "unhealthy"  # the node failed its health check before the attempt (supervisor/health.py)
    PEER_FAILURE = "peer_failure"  # multi-node: another node failed first; this node's workers ended with it


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
