"""Entry points: `python -m scripts.<name>`, alone or under torchrun.

Under torchrun a worker must never outlive its launcher: torchrun starts each worker in a session of its own, so a
killed torchrun would leave them running. The parent-death signal is armed here, before the entry point's own
imports (seconds of torch) open a window in which torchrun could die unnoticed. The worker then gets SIGTERM: during
start-up that ends it; once training, the trainer saves a checkpoint and exits.
"""

import os
import signal

from nanochat.lifeline import die_with_parent, orphaned

if os.environ.get("TORCHELASTIC_RUN_ID") and (not die_with_parent(signal.SIGTERM) or orphaned()):
    os._exit(128 + signal.SIGTERM)  # torchrun died while this process was starting
