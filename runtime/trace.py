"""Chrome/Perfetto trace files, shared by `polyarch run --trace` (measured) and
`polyarch plan --trace` (predicted)."""

import json
from typing import Iterable

from ..files import atomic_write


def write_chrome_trace(path: str, process: str, events: list, tracks: Iterable = (), other: list | None = None) -> None:
    """events: [{name, kind, track, start (s), dur (s), args}]; tracks: names shown first."""
    tracks = list(dict.fromkeys(list(tracks) + [e["track"] for e in events]))
    tid = {t: i for i, t in enumerate(tracks)}
    t0 = min((e["start"] for e in events), default=0.0)
    out = [{"ph": "M", "pid": 0, "name": "process_name", "args": {"name": process}}]
    out += [{"ph": "M", "pid": 0, "tid": tid[t], "name": "thread_name", "args": {"name": t}} for t in tracks]
    for e in events:
        out.append({"ph": "X", "pid": 0, "tid": tid[e["track"]], "name": e["name"], "cat": e["kind"],
                    "ts": round((e["start"] - t0) * 1e6, 3), "dur": round(e["dur"] * 1e6, 3), "args": e["args"]})
    with atomic_write(path) as f:  # never half a trace over an old one
        json.dump({"traceEvents": out, "displayTimeUnit": "ms", "otherData": other or {}}, f, indent=1)
