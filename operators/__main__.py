"""``python -m operators``: run the operator in the foreground, all namespaces, no peering (one replica).

Same as ``kopf run --standalone --all-namespaces -m operators.main``; see operators/main.py for the settings.
"""

from __future__ import annotations

import asyncio

import kopf

from operators.handlers import OperatorSettings, register


def main() -> None:
    registry = kopf.OperatorRegistry()
    register(registry, OperatorSettings.from_env())
    asyncio.run(kopf.operator(registry=registry, standalone=True, clusterwide=True,
                              liveness_endpoint="http://0.0.0.0:8080/healthz"))


if __name__ == "__main__":
    main()
