"""The operator under tracemalloc, for bench.operator_scale --memory (a profile, not a test).

Runs `python -m fst_operator` with tracemalloc on (4 frames) and, every 10 s, writes the top
allocation sites by size into $FST_MEMPROBE_OUT (one block per snapshot, largest total first
when read back with `sort`). tracemalloc slows the operator several-fold and adds its own
memory: use it to find where memory goes, not to measure how much.
"""

from __future__ import annotations

import os
import threading
import time
import tracemalloc


def _dump_forever(path: str, every_s: float = 10.0, top: int = 30) -> None:
    while True:
        time.sleep(every_s)
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)]
        )
        stats = snapshot.statistics("traceback")
        total = sum(s.size for s in stats)
        with open(path, "a") as out:
            out.write(f"=== t={time.monotonic():.0f} traced {total / 2**20:.1f} MiB\n")
            for s in stats[:top]:
                out.write(f"{s.size / 2**20:8.2f} MiB {s.count:8d} blocks\n")
                for line in s.traceback.format(limit=4):
                    out.write(f"    {line}\n")


def main() -> None:
    tracemalloc.start(4)
    path = os.environ.get("FST_MEMPROBE_OUT", "operator-memory.txt")
    threading.Thread(target=_dump_forever, args=(path,), daemon=True).start()
    from fst_operator.__main__ import main as operator_main

    operator_main()


if __name__ == "__main__":
    main()
