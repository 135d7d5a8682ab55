"""Summarise py-spy's collapsed stacks (``--format raw``, as ``--scale-profile`` records them):
the functions that take the most samples, on their own and with what they call.

    python -m bench.stacks FILE [--top N]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>.*?)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    """``function (path/module.py:line)`` as ``module.py:function``, lines merged."""
    match = _FRAME.match(frame)
    if match is None:
        return frame
    return f"{match['file'].rpartition('/')[2]}:{match['function']}"


def summarise(lines, top: int) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in lines:
        match = _LINE.match(line.rstrip("\n"))
        if match is None:
            continue
        count = int(match["count"])
        frames = [frame_name(f) for f in match["stack"].split(";") if f]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    if not total:
        return "no samples"
    out = [f"{total} samples", "", "own time:"]
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    out += ["", "inclusive time:"]
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("file")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    with open(args.file) as file:
        print(summarise(file, args.top))


if __name__ == "__main__":
    main()
