"""The Pipeline operator (Kopf): it reconciles Pipeline custom resources into KubeRay RayJobs, one stage at a time.
Imports neither Ray nor torch (checked by the tests), so the operator image stays small. The manifests themselves
(Pipeline spec, CRD, RayJob / RayCluster rendering) live in ``shared.manifests``, which ``scopeforge render`` and
``submit`` use too.

    operators/reconcile.py  the state machine: status + owned RayJobs (+ their clusters' pods) -> next step and status
    operators/config.py     the operator's settings file: interval, start deadline, the Pipeline policy
    operators/policy.py     the policy checked on every stage's rendered RayJob (images, Secrets, service accounts)
    operators/startup.py    why a stage's cluster does not start (its pods), and the start deadline
    operators/kube.py       a small aiohttp Kubernetes client (create/list/delete RayJobs, list pods; no Secrets)
    operators/handlers.py   the Kopf handlers; operators/main.py is what `kopf run` loads
    operators/generate.py   writes every generated manifest (make manifests)
"""
