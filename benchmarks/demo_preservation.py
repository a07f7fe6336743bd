"""Benchmark: does preservation (train.preservation_class) lower the demo's bleed at a similar
concept score? The shipped quickstart (configs/quickstart.json: the magenta star "sks" on
builtin:tiny-flux, with preservation, class "shape") is trained twice from the same seed,
without and with preservation, and each run's demo_scores.json (core/demo/score.py: the
same 8 sampling seeds for both) is printed side by side, with the ratios.

    python benchmarks/demo_preservation.py                      # a few minutes on 2 CPU cores
    python benchmarks/demo_preservation.py --class-word star --lr-with 3e-3
"""
import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # image-processor notes, not about the runs
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from loralab.core.demo.score import FILE  # noqa: E402
from loralab.core.config import load_config  # noqa: E402
from loralab.core.trainer import train  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "quickstart.json")


def run(output, name, **train_changes):
    config = load_config(CONFIG)
    config["name"] = name
    config["save"]["output_dir"] = output
    config["sample"]["sample_every"] = 0
    config["train"].update(train_changes)
    start = time.perf_counter()
    result = train(config)
    with open(os.path.join(result.run_folder, FILE), encoding="utf-8") as f:
        return json.load(f), time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--class-word", default=None, help="default: the quickstart's")
    parser.add_argument("--weight", type=float, default=1.0)
    parser.add_argument("--lr-without", type=float, default=None, help="default: the quickstart's")
    parser.add_argument("--lr-with", type=float, default=None, help="default: the quickstart's")
    args = parser.parse_args()
    shipped = load_config(CONFIG)["train"]
    shipped_lr = shipped["lr"]
    args.class_word = args.class_word or shipped["preservation_class"]
    args.lr_with = args.lr_with or shipped_lr
    with tempfile.TemporaryDirectory() as output:
        without, seconds_without = run(output, "without", lr=args.lr_without or shipped_lr, preservation_class="")
        with_it, seconds_with = run(output, "with", lr=args.lr_with, preservation_class=args.class_word,
                                    preservation_weight=args.weight)
    base = without["base"]
    print(f"demo, {len(without['seeds'])} seeds: star = sks pictures showing the magenta star; red / round ="
          " 'a red circle on a white background' still red on white / also round")
    print(f"{'':34} {'star':>6} {'red':>6} {'round':>6} {'s/run':>7}")
    print(f"{'base model':34} {base['star']:6.0%} {base['red']:6.0%} {base['red_circle']:6.0%}")
    print(f"{'without (lr %g)' % (args.lr_without or shipped_lr):34} {without['lora']['star']:6.0%} "
          f"{without['lora']['red']:6.0%} {without['lora']['red_circle']:6.0%} {seconds_without:7.0f}")
    label = f"with '{args.class_word}' x{args.weight:g} (lr {args.lr_with:g})"
    print(f"{label:34} {with_it['lora']['star']:6.0%} {with_it['lora']['red']:6.0%} "
          f"{with_it['lora']['red_circle']:6.0%} {seconds_with:7.0f}")
    bleed_without = 1 - without["lora"]["red_circle"]
    bleed_with = 1 - with_it["lora"]["red_circle"]
    print(f"bleed (red circle no longer red and round): {bleed_without:.0%} -> {bleed_with:.0%}; "
          f"concept {without['lora']['star']:.0%} -> {with_it['lora']['star']:.0%}; "
          f"time {seconds_with / seconds_without:.1f}x")


if __name__ == "__main__":
    main()
