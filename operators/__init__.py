"""The Kubernetes side of scopeforge: the Pipeline custom resource, its operator (Kopf), and the KubeRay objects
rendered from code. Imports neither Ray nor torch (checked by the tests), so the operator image stays small.

    operators/spec.py       the Pipeline spec models; mapping onto shared PipelineConfig
    operators/schema.py     pydantic JSON schema -> Kubernetes structural schema
    operators/crd.py        the Pipeline CRD, generated from the job config models (python -m operators.crd)
    operators/render.py     RayCluster / RayJob manifests, deterministic names, KubeRay's operator-side rules
    operators/reconcile.py  the state machine: status + owned RayJobs -> next RayJob and new status
    operators/kube.py       a small aiohttp Kubernetes client (create/list RayJobs, read a Secret)
    operators/handlers.py   the Kopf handlers; operators/main.py is what `kopf run` loads
    operators/generate.py   writes every generated manifest (make manifests)
"""
