"""The run's state and the stop requests, shared by the decision loop (agent.py), the attempt it watches
(watch.py) and the agreement with other nodes (peers.py): the one place that changes `RunState`."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field

from supervisor.display import Display, View
from supervisor.states import RunState

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2  # the trainer refused its settings or checkpoint: as bad usage, not a failed run
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM after saving; a scheduler should requeue the job
EXIT_INTERRUPTED = 130  # stopped by Ctrl+C after saving


@dataclass
class Lifecycle:
    display: Display
    view: View
    state: RunState = RunState.STARTING
    signals: list[int] = field(default_factory=list)  # the stop signals received, in order

    def set(self, new: RunState, why: str = "") -> None:
        """Move to `new` (said on the display when it changes); a final state never changes."""
        if self.state.final:
            raise AssertionError(f"{self.state.name} -> {new.name}: a final state never changes")
        old, self.state = self.state, new
        self.view.state = new.value
        if old is not new:
            self.display.event(f"{old.value} -> {new.value}" + (f": {why}" if why else ""))

    def stopping(self, why: str) -> None:
        """A stop is being delivered: STARTING/HEALTHY -> STOPPING, or just say it."""
        if self.state.running:
            self.set(RunState.STOPPING, why)
        else:
            self.display.event(why)

    def on_signal(self, signum: int, frame) -> None:
        self.signals.append(signum)

    @property
    def stop_requested(self) -> bool:
        return bool(self.signals)

    def stop_code(self) -> int:
        """The exit code of a run stopped here: a scheduler requeues a SIGTERMed job."""
        return EXIT_PREEMPTED if signal.SIGTERM in self.signals else EXIT_INTERRUPTED

    def sleep(self, seconds: float, tick: float) -> bool:
        """Sleep, waking for signals; True if a stop was requested."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.signals:
            time.sleep(max(0.0, min(tick, deadline - time.monotonic())))
        return bool(self.signals)
