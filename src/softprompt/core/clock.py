"""When this process started: the zero of `train/time_to_first_step_process_s`."""

from __future__ import annotations

import os
import time
from pathlib import Path


def process_start() -> float:
    """When this process started, as a `time.time()` value.

    On Linux: its start in clock ticks since boot (/proc/self/stat) against CLOCK_BOOTTIME, exact
    to a tick (10 ms). psutil's `create_time()` adds that start to /proc/stat's boot time, which is
    whole seconds: measured 0.75 s early on the dev VM, so time to first step read 0.75 s long.
    """
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        since_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - since_boot)
    except (OSError, IndexError, ValueError, AttributeError):  # not Linux
        import psutil

        return psutil.Process().create_time()
