"""Table 1 of the paper on the synthetic benchmark: ``python benchmarks/table1.py [ARGS]``.

The same as ``stvr bench table1 [ARGS]`` (see ``stvr bench table1 --help``):
trains Clip, ConvLSTM, Optical Flow, TrajLSTM and Warp LSTM with the same data,
budget and seeds, evaluates each on the synthetic test pairs, prints the
Markdown table and writes ``benchmarks/results/table1.md`` and ``table1.json``.
Resumable: finished runs are skipped, unfinished ones resume.
"""

import sys

from stvr.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "table1", *sys.argv[1:]]))
