"""`python -m fst_operator`: run the operator (what the chart's Deployment runs).

    python -m fst_operator [--namespace NS ...] [--verbose]

Watches FastSlowRuns and TaskStreams in the given namespaces (default: $FST_WATCH_NAMESPACES,
else all), with a liveness endpoint on :$FST_LIVENESS_PORT/healthz and Prometheus metrics on
:$FST_METRICS_PORT/metrics. Settings: fst_operator/settings.py.
"""

from __future__ import annotations

import argparse
import logging

import kopf

from fst_operator import handlers, kube  # noqa: F401  (importing registers the handlers)
from fst_operator.handlers import SETTINGS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fst_operator",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=None,
        help="namespace to watch (repeatable); default $FST_WATCH_NAMESPACES",
    )
    parser.add_argument("--verbose", "-v", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    namespaces = args.namespace or SETTINGS.namespaces
    kube.watch_namespaces(namespaces)
    liveness = (
        f"http://0.0.0.0:{SETTINGS.liveness_port}/healthz" if SETTINGS.liveness_port else None
    )
    kopf.run(
        standalone=True,  # one replica (Deployment strategy Recreate): no peering needed
        clusterwide=not namespaces,
        namespaces=namespaces or [],
        liveness_endpoint=liveness,
    )


if __name__ == "__main__":
    main()
