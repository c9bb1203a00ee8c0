"""The speed probe's process: `python -m quantkit.eval.probe ARGS.json` (written by
eval.speed.run_probe) measures one model and prints its figures as one JSON line."""

from __future__ import annotations

import json
import sys

from ..util.errors import QuantkitError


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m quantkit.eval.probe ARGS.json", file=sys.stderr)
        return 1
    with open(argv[0]) as f:
        a = json.load(f)
    try:
        if a.get("kind") == "classifier":
            from .classify import probe_classifier
            res = probe_classifier(a["path"], a["tokens"], a["runs"], a["n_threads"])
        else:
            from .speed import probe
            res = probe(a["path"], a["tokens"], a["n_gen"], a["runs"], a["n_threads"])
    except QuantkitError as e:
        print(str(e), file=sys.stderr)
        return 2
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
