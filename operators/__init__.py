"""The Pipeline operator (Kopf): it reconciles Pipeline custom resources into KubeRay RayJobs, one stage at a time.
Imports neither Ray nor torch (checked by the tests), so the operator image stays small. The manifests themselves
(Pipeline spec, CRD, RayJob / RayCluster rendering) live in ``shared.manifests``, which ``scopeforge render`` and
``submit`` use too.

    operators/reconcile.py  the state machine: status + owned RayJobs -> next RayJob and new status
    operators/kube.py       a small aiohttp Kubernetes client (create/list RayJobs, read a Secret)
    operators/handlers.py   the Kopf handlers; operators/main.py is what `kopf run` loads
    operators/generate.py   writes every generated manifest (make manifests)
"""
