"""Benchmarks: `python scripts/bench.py <name> [options]`; `--help` after a name for its options.

    shapes       ShapesWorld render / caption / detect throughput
    transformer  backbone forward+backward tokens/s, FLOP/s, MFU (CPU; bf16/compile/flex on CUDA)
    sampling     Transfusion text->image seconds per image, prompt KV-cached vs recomputed
    train-step   a family recipe's training step: row length (pack_len) x SDPA kernel choice
    ddp          a recipe trained by one process against DDP / FSDP ranks: step time, docs/s
    encoded      stage-2 step time from pre-encoded shards against encoding on the fly
    peer         fusion against transfusion-pytorch: training step and text->image sample
    loader       the training loader alone (documents/s) against what the training step consumes
    family-step  a whole family training step at a backbone size: tokens/s, MFU, memory, parts
"""

import importlib
import sys

BENCHMARKS = {"shapes": "fusion.benchmarks.shapes",
              "transformer": "fusion.benchmarks.transformer",
              "sampling": "fusion.benchmarks.sampling",
              "train-step": "fusion.benchmarks.train_step",
              "ddp": "fusion.benchmarks.ddp",
              "encoded": "fusion.benchmarks.encoded",
              "peer": "fusion.benchmarks.peer",
              "loader": "fusion.benchmarks.loader",
              "family-step": "fusion.benchmarks.family_step"}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
        print(__doc__)
        sys.exit(0 if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help") else 2)
    importlib.import_module(BENCHMARKS[sys.argv[1]]).main(sys.argv[2:])


if __name__ == "__main__":
    main()
