"""The operator as Kopf runs it in its Deployment::

    kopf run --standalone --all-namespaces --liveness=http://0.0.0.0:8080/healthz -m operators.main

Settings (operators/config.py) come from the YAML file named by SCOPEFORGE_OPERATOR_CONFIG (the ConfigMap
scopeforge-operator-config: interval, start deadline, the Pipeline policy), with SCOPEFORGE_IMAGE (the image of the
stage clusters when a Pipeline names none; the Deployment sets it to the RayCluster's image),
SCOPEFORGE_RECONCILE_SECONDS and SCOPEFORGE_START_DEADLINE_SECONDS overriding single fields.
"""

from __future__ import annotations

import kopf

from operators.handlers import OperatorSettings, register

register(kopf.get_default_registry(), OperatorSettings.from_env())
