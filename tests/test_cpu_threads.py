"""The CPU thread policy (core/cpu_threads.py): OpenMP's wait policy is chosen before torch loads
in the CLI, the thread count follows the cores other processes leave free, a user's own
OMP_NUM_THREADS is kept, and a run gives torch's count back (ComfyUI's process goes on)."""
import os
import subprocess
import sys

import torch

from loralab.core import cpu_threads


def test_the_cli_sets_passive_waits_before_torch_loads():
    """OpenMP reads OMP_WAIT_POLICY once, when torch loads it: after `loralab`'s first line runs,
    torch must not be loaded yet, and the policy must be in the environment."""
    code = ("import os, sys\n"
            "import loralab.cli\n"
            "assert 'torch' not in sys.modules, 'loralab.cli imports torch before main() runs'\n"
            "from loralab.core.cpu_threads import prefer_passive_waits\n"
            "prefer_passive_waits()\n"
            "import torch\n"
            "print(os.environ.get('OMP_WAIT_POLICY'))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", cpu_threads.SETTING)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "PASSIVE"


def test_the_count_is_the_free_cores_and_a_users_setting_wins(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(cpu_threads.SETTING, raising=False)
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: 8)
    monkeypatch.setattr(cpu_threads, "busy_cores", lambda: 2.7)
    assert cpu_threads.training_thread_count() == 5
    monkeypatch.setattr(cpu_threads, "busy_cores", lambda: 12.0)  # more busy than we have
    assert cpu_threads.training_thread_count() == 1
    monkeypatch.setenv(cpu_threads.SETTING, "3")
    assert cpu_threads.training_thread_count() == 3
    monkeypatch.setenv(cpu_threads.SETTING, "torch")
    assert cpu_threads.training_thread_count() is None
    monkeypatch.delenv(cpu_threads.SETTING)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads.training_thread_count() is None


def test_busy_cores_reads_this_machine():
    assert 0.0 <= cpu_threads.busy_cores(0.05) <= (os.cpu_count() or 1) + 0.01


def test_a_run_gives_torchs_thread_count_back(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv(cpu_threads.SETTING, str(before + 1))
    with cpu_threads.training_threads("cpu"):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
    with cpu_threads.training_threads("cuda"):  # on a GPU, torch's CPU threads are left alone
        assert torch.get_num_threads() == before
