# The Pipeline operator's own image: Python, Kopf and the few libraries operators/ imports (pydantic, PyYAML, fsspec),
# pinned by constraints.txt; no Ray, no torch, no CUDA (tens of MB instead of several GB, and far less to patch).
# The operator only renders and watches Kubernetes objects; the stage clusters run the full image (../../Dockerfile).
#
#   docker build -f manifests/image/operator.Dockerfile -t REGISTRY/scopeforge-operator:TAG .
#
# Kubernetes takes the reference from manifests/image/kustomization.yaml (`images:`, name scopeforge-operator).
# tests/test_operator.py checks that OPERATOR_DEPS covers everything `import operators.main` loads.
ARG PYTHON_IMAGE=python:3.11-slim

# --- stage 1: the project's wheel (its dependencies are not installed: most of them are the jobs', not ours) ---
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /build
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY ray_jobs ./ray_jobs
COPY operators ./operators
RUN pip wheel --no-cache-dir --no-deps -w /dist .

# --- stage 2: the operator ----------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ARG OPERATOR_DEPS="kopf pydantic PyYAML fsspec"
LABEL org.opencontainers.image.title="scopeforge-operator" \
      org.opencontainers.image.description="The scopeforge Pipeline operator (Kopf): Pipelines into KubeRay RayJobs" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY constraints.txt /tmp/constraints.txt
COPY --from=wheel /dist /tmp/dist
RUN pip install --no-cache-dir -c /tmp/constraints.txt ${OPERATOR_DEPS} \
 && pip install --no-cache-dir --no-deps /tmp/dist/scopeforge-*.whl \
 && rm -rf /tmp/dist /tmp/constraints.txt \
 && useradd --uid 1000 --no-create-home --shell /usr/sbin/nologin operator \
 && cd /tmp && python -c "import importlib.util as u, operators.main; \
assert u.find_spec('ray') is None and u.find_spec('torch') is None"
USER 1000
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
ENTRYPOINT []
CMD ["kopf", "run", "--standalone", "--all-namespaces", "--liveness=http://0.0.0.0:8080/healthz", "-m", "operators.main"]
