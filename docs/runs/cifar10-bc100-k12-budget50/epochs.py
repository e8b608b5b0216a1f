"""Print the card's per-epoch table (markdown) from a run's metrics.csv.

Usage: python docs/runs/cifar10-bc100-k12-budget50/epochs.py [RUN_DIR]  (default: this folder)
"""
import csv
import sys
from pathlib import Path

from densenet.analysis import markdown_table

HEADER = ["epoch", "lr", "train loss", "train error", "test error", "average's test error", "minutes", "images/s"]


def percent(value: str) -> str:
    return f"{float(value):.2f}%" if value else "-"


def main() -> None:
    run = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
    with open(run / "metrics.csv", newline="") as f:
        rows = [[r["epoch"], f"{float(r['lr']):.4f}", f"{float(r['train_loss']):.3f}", percent(r["train_error"]),
                 percent(r["test_error"]), percent(r["ema_test_error"]), f"{float(r['seconds']) / 60:.1f}",
                 f"{float(r['images_per_s']):.1f}"] for r in csv.DictReader(f)]
    print(markdown_table(HEADER, rows))


if __name__ == "__main__":
    main()
