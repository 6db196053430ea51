"""``scopeforge demo NAME``: the embedded end-to-end demos (each a module with ``main(args) -> int``).

    scopeforge demo deepfake [--config FILE] [--set KEY=VALUE ...] [--force]
"""

from __future__ import annotations

import argparse

from ray_jobs.cli import add_config_arguments

DEMOS = ("deepfake", "finescope")


def add_parser(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="run an embedded end-to-end demo (offline)",
                          description="Run an embedded end-to-end demo: " + ", ".join(sorted(DEMOS)))
    demo.add_argument("name", choices=sorted(DEMOS), help="which demo")
    add_config_arguments(demo)
    demo.add_argument("--force", action="store_true", help="rerun every stage, even those already done")
    demo.add_argument("--ray-address", help="Ray cluster to connect to (default: RAY_ADDRESS, else start one locally)")


def demo(args: argparse.Namespace) -> int:
    """Run the demo; its module (Ray, torch) is imported only now, so the CLI stays light."""
    if args.name == "deepfake":
        from ray_jobs.demo_deepfake import main
    else:
        from ray_jobs.demo_finescope import main
    return main(args)
