"""Benchmark: does a CPU run slow down in proportion to the CPU it loses on a busy machine?

The quickstart's training step (configs/quickstart.json, builtin:tiny-flux at 64 px) runs N
steps in a fresh process per variant, alone and beside a busy process (a Python spin loop at
nice 19, as a user's other work would be), under the old thread policy (torch's default: one
OpenMP thread per core, GNU OpenMP's spin-waiting threads) and the new one
(core/cpu_threads.py: passive waiting, threads = the cores that are free). All variants run in
one invocation, interleaved round by round, because a shared machine's load drifts. Prints the
median seconds per step of each and the ratios busy/alone.

Losing one core of two to a nice-19 process should cost at most about 2x; torch's default
policy measured up to 34x per step (issue 21).

    python benchmarks/busy_machine.py [--steps 40] [--rounds 3]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "quickstart.json")
BUSY = [sys.executable, "-c", "while True: pass"]

# policy name -> environment changes of the training process. "old" is torch's default as a
# user's shell has it; "new" lets the CLI choose (loralab.core.cpu_threads, applied by train()).
POLICIES = {
    "old": {"LORALAB_CPU_THREADS": "torch"},
    "new": {},
    # the two halves of "new" alone, to show which part matters
    "passive": {"LORALAB_CPU_THREADS": "torch", "OMP_WAIT_POLICY": "PASSIVE"},
    "1thread": {"LORALAB_CPU_THREADS": "torch", "OMP_NUM_THREADS": "1"},
}


def child(steps, output):
    """One training process: the quickstart's settings, `steps` steps, no samples, no scoring.
    Prints the seconds of each step after the first few (warm-up) as JSON."""
    sys.path.insert(0, ROOT)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from loralab.core.cpu_threads import prefer_passive_waits

    prefer_passive_waits()  # as the CLI does first, before torch loads
    from loralab.core.config import load_config
    from loralab.core.trainer import train

    config = load_config(CONFIG)
    config["name"] = "busy"
    config["save"].update(output_dir=output, save_every=10**6)
    config["sample"]["sample_every"] = 0
    config["train"].update(steps=steps, resume=False)
    config["dataset"]["folder"] = "builtin:demo-shapes"  # not builtin:demo: no demo scoring at the end
    config["train"]["preservation_class"] = ""
    config["dataset"]["trigger_word"] = ""
    times, threads = [], []

    def on_event(event):
        if event["type"] == "step":
            times.append(time.perf_counter())
            threads[:] = threads or [torch.get_num_threads()]  # the count train() chose

    import torch

    train(config, on_event=on_event)
    print(json.dumps({"seconds": [b - a for a, b in zip(times[5:], times[6:])], "threads": threads[0]}))


def measure(policy, busy, steps):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update(POLICIES[policy])
    hog = subprocess.Popen(["nice", "-n", "19", *BUSY]) if busy else None
    try:
        with tempfile.TemporaryDirectory() as output:
            done = subprocess.run([sys.executable, __file__, "--child", str(steps), output], env=env,
                                  capture_output=True, text=True, timeout=3600)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return statistics.median(result["seconds"]), max(result["seconds"]), result["threads"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(int(args.child[0]), args.child[1])
    policies = args.policies.split(",")
    results = {(p, b): [] for p in policies for b in (False, True)}
    load_before = os.getloadavg()[0]
    for round_ in range(args.rounds):
        for policy in policies:
            for busy in (False, True):
                median, worst, threads = measure(policy, busy, args.steps)
                results[policy, busy].append((median, worst))
                print(f"round {round_ + 1}: {policy:6} {'busy ' if busy else 'alone'} {threads} threads: "
                      f"median {median:.3f} s/step, slowest {worst:.3f}", flush=True)
    print(f"\n{os.cpu_count()} CPUs, {args.steps} steps x {args.rounds} rounds, quickstart settings; "
          f"busy = one `while True: pass` at nice 19; load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after (other work on the machine counts as 'alone' too)")
    reference = "old" if "old" in policies else policies[0]
    busy_old = statistics.median(m for m, _ in results[reference, True])
    print(f"{'policy':8} {'alone s/step':>13} {'busy s/step':>12} {'busy/alone':>11} {'slowest busy step':>18}"
          f" {'busy vs ' + reference + ' busy':>17}")
    for policy in policies:
        alone = statistics.median(m for m, _ in results[policy, False])
        busy = statistics.median(m for m, _ in results[policy, True])
        worst = max(w for _, w in results[policy, True])
        print(f"{policy:8} {alone:13.3f} {busy:12.3f} {busy / alone:11.2f} {worst:18.3f} {busy / busy_old:17.2f}")


if __name__ == "__main__":
    main()
