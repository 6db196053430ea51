"""The operator as Kopf runs it in its Deployment::

    kopf run --standalone --all-namespaces --liveness=http://0.0.0.0:8080/healthz -m operators.main

Settings come from the environment: SCOPEFORGE_RECONCILE_SECONDS (default 10), SCOPEFORGE_IMAGE (the image of the
stage clusters when a Pipeline names none; the Deployment sets it to its own image).
"""

from __future__ import annotations

import kopf

from operators.handlers import OperatorSettings, register

register(kopf.get_default_registry(), OperatorSettings.from_env())
