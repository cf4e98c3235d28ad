"""Sub-commands of the ``stvr`` CLI.

Each module here defines ``register(subparsers)`` which adds its sub-command(s)
to the top-level ``argparse`` sub-parser set; ``stvr.cli`` imports them in a
fixed order. A command's handler is stored with ``parser.set_defaults(func=...)``
and receives the parsed ``argparse.Namespace``; it returns an exit code.
"""

COMMAND_MODULES = (
    "data",        # stvr data synth|ava|ucf24|stats
    "model",       # stvr model info
    "evaluate",    # stvr evaluate
    "train",       # stvr train
    "pretrain",    # stvr pretrain
    "predict",     # stvr predict
    "demo",        # stvr demo
    "bench",       # stvr bench table1
    "relocalize",  # stvr relocalize
    "viz",         # stvr viz ...
)
