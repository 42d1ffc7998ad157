"""Draw a run's charts from RUN_DIR/metrics.jsonl into RUN_DIR/plots (or --out).

    python scripts/plot_run.py runs/tiny
    python scripts/plot_run.py runs/tiny --out /tmp/tiny-plots

Writes loss.png (loss per recurrent step), exit_distribution.png (the mean exit distribution
over training, stacked), optimization.png (learning rate, gradient norm with skipped steps,
exit entropy) and throughput.png (tokens/s, MFU). The drawing lives in `train.plotting`,
which the training job also calls when a run ends.
"""

from __future__ import annotations

import argparse
import sys

from train.plotting import plot_run


def main(argv: list[str] | None = None) -> int:
    """Draw the charts; print the written paths, or the problem and return 1."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", help="run directory holding metrics.jsonl")
    parser.add_argument("--out", help="directory for the PNG files (default: RUN_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        paths = plot_run(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
