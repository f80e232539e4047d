"""The commands of `dpface`: one module each (train, eval, convert, plan, export, kernels,
cluster), each with ``add_parser(sub)`` and a ``run`` that imports what it needs when it
runs, so building the parser imports no torch; errors.py holds the exit codes, the error
types and the one-line message an expected failure becomes. dpface/cli.py assembles them."""

ORDER = ("train", "eval", "plan", "kernels", "export", "convert", "cluster")  # the order of `dpface -h`
