"""Preemption: SIGTERM, SIGUSR1 or SIGUSR2 ask a run to stop at the next step boundary.

What a cluster does before it takes a node away: SLURM sends SIGTERM on preemption (then SIGKILL
after its GraceTime) and, with `sbatch --signal=USR1@SECONDS`, SIGUSR1 that long before the time
limit; submitit (hydra-submitit-launcher) asks for SIGUSR2 by default (SUBMITIT_PREEMPT_SIGNAL).
Under `wandb agent` a SIGTERM can also be the agent's half of a sweep controller's stop (hyperband):
the agent sends it (then SIGKILL after 30 s) while the SDK reports the same stop to the run's
`stop_fn`. softprompt.train.pack tells the two apart: a SIGTERM whose runs the controller stopped is
a stop (the jobs are written as stopped results and the process exits 0), any other stays a
preemption.

The handler only records the signal and writes the run dir's preemption marker (a requeued job
that finds it resumes by itself, also after a SIGKILL that came before the checkpoint). The
training loop checks the flag after each optimizer step, writes a complete checkpoint there and
raises `Preempted`; the run then marks its W&B run as preempting, finishes it with exit code
128 + signal (W&B's convention: non-zero plus mark_preempting = preempted, not failed) and the
process exits with that same status, what a shell reports for a process the signal killed.

A handler that was installed before ours (submitit installs one for each of these signals in the
job process) is called after the checkpoint is written: submitit's requeues the job on its
signal (`scontrol requeue`) and only logs SIGTERM, which SLURM's own preempt-requeue handles.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any, Self

from softprompt.core.errors import UserError
from softprompt.core.rundir import RunDir

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Preempted(Exception):
    """The run stopped at a step boundary on a preemption signal, with a checkpoint written."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"preempted by {signal.Signals(signum).name} at step {step}")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class Watch:
    """Catches the preemption signals while a run trains (a context manager; main thread only)."""

    def __init__(self, run_dir: Path | None, write_marker: bool = True):
        self.run_dir = run_dir
        self.write_marker = write_marker
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def requested(self) -> int | None:
        """The first preemption signal received, None while none came."""
        return self.signum

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            return  # a second signal changes nothing: the checkpoint is coming
        self.signum = signum
        # Python runs handlers in the main thread between bytecodes, so a file write is safe here;
        # the marker is written at once so that a SIGKILL before the step boundary still leaves it
        if self.write_marker and self.run_dir is not None:
            try:
                RunDir(self.run_dir).write_preempted(signal.Signals(signum).name)
            except (OSError, UserError):
                pass  # a full disk (RunDir makes it a UserError): the checkpoint write will report it
        print(f"received {signal.Signals(signum).name}: stopping after this step with a checkpoint", flush=True)

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def forget(self) -> None:
        """The signal was not a preemption (a sweep controller's stop, softprompt.train.pack): the
        run goes on to its clean end, and the marker would make a rerun resume it."""
        self.signum = None
        if self.write_marker and self.run_dir is not None:
            RunDir(self.run_dir).preempted.unlink(missing_ok=True)

    def chain(self, signum: int) -> None:
        """Call the handler that was installed before ours (submitit's), if it was a Python one."""
        handler = self.previous.get(signum)
        if callable(handler) and handler is not signal.default_int_handler:
            handler(signum, None)
