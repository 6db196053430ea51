"""Kubernetes manifests of scopeforge, as plain data: the Pipeline custom resource's spec (``spec``), the RayJob and
RayCluster a job runs as (``render``), the Pipeline CRD and its structural schema (``crd``, ``schema``).

Both ``scopeforge render`` / ``submit`` (ray_jobs) and the operator (operators/) build on this one module; it imports
neither Ray, torch nor the Kubernetes client.
"""
