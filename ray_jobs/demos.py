"""``scopeforge demo NAME``: the embedded end-to-end demos (each a module with ``main(args) -> int``).

    scopeforge demo deepfake [--config FILE] [--set KEY=VALUE ...] [--force]
"""

from __future__ import annotations

import argparse
import importlib

from ray_jobs.cli import PARSER_EXTENSIONS, add_config_arguments, command

DEMOS: dict[str, str] = {
    "deepfake": "ray_jobs.demo_deepfake",
    "finescope": "ray_jobs.demo_finescope",
}
"""Demo name -> module with ``main(args)``; imported only when that demo runs (the CLI stays light)."""


def _add_parser(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="run an embedded end-to-end demo (offline)",
                          description="Run an embedded end-to-end demo: " + ", ".join(sorted(DEMOS)))
    demo.add_argument("name", choices=sorted(DEMOS), help="which demo")
    add_config_arguments(demo)
    demo.add_argument("--force", action="store_true", help="rerun every stage, even those already done")
    demo.add_argument("--ray-address", help="Ray cluster to connect to (default: RAY_ADDRESS, else start one locally)")


@command("demo")
def _demo(args: argparse.Namespace) -> int:
    return importlib.import_module(DEMOS[args.name]).main(args)


PARSER_EXTENSIONS.append(_add_parser)
