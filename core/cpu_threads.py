"""How many threads a CPU run uses, and how they wait: the one place that decides it.

Why: torch's CPU wheel runs its ops on GNU OpenMP threads, one per core, which spin while they
wait for each other. A step of a small model is thousands of short parallel regions; when another
process takes one core, the thread there is descheduled and its sibling spins at every region's
barrier until the scheduler brings it back (milliseconds each time). A quickstart step measured up
to 34x slower beside one nice-19 process (issue 21, benchmarks/busy_machine.py). Threads that
sleep while they wait (OMP_WAIT_POLICY=PASSIVE) give that core back, and one thread per free core
leaves no thread waiting for a core it will not get.

A user's own OMP_NUM_THREADS / OMP_WAIT_POLICY are kept; LORALAB_CPU_THREADS=torch leaves torch's
defaults (the old policy, for benchmarks/busy_machine.py), a number sets the count."""
import contextlib
import os
import sys
import time

SETTING = "LORALAB_CPU_THREADS"


def prefer_passive_waits():
    """Sets OMP_WAIT_POLICY=PASSIVE for this process when torch is not loaded yet (OpenMP reads it
    once, when torch loads it): the CLI calls this first. In ComfyUI torch is already loaded and
    this changes nothing."""
    if os.environ.get(SETTING) != "torch" and "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def usable_cores():
    """The cores this process may run on (its affinity, e.g. a container's CPU set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def busy_cores(seconds=0.2):
    """How many cores other processes keep busy now, from /proc/stat over `seconds` (0 where there
    is no /proc/stat). Sampled once at the start of a run."""
    def totals():
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # all, idle + iowait (in clock ticks)

    try:
        all_before, idle_before = totals()
        time.sleep(seconds)
        all_after, idle_after = totals()
    except (OSError, ValueError, IndexError):
        return 0.0
    elapsed = all_after - all_before
    if elapsed <= 0:
        return 0.0
    return (os.cpu_count() or 1) * (1 - (idle_after - idle_before) / elapsed)


def training_thread_count():
    """Threads for a CPU run: the usable cores less those other processes keep busy (at least 1);
    None leaves torch's own count (the user set OMP_NUM_THREADS, or LORALAB_CPU_THREADS=torch)."""
    chosen = os.environ.get(SETTING, "")
    if chosen == "torch" or (not chosen and os.environ.get("OMP_NUM_THREADS")):
        return None
    if chosen.isdigit():
        return max(1, int(chosen))
    cores = usable_cores()
    return max(1, min(cores, round(cores - busy_cores())))


@contextlib.contextmanager
def training_threads(device_type):
    """Around a training run on `device_type`: on a CPU, torch's intra-op threads are set to
    training_thread_count() and given back afterwards (ComfyUI's process goes on after a run)."""
    count = training_thread_count() if device_type == "cpu" else None
    if count is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
