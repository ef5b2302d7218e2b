# The kernelgate image the k8s/ manifests run (`kernelgate authz`, `kernelgate serve`).
# Not built in CI here (no container engine on these machines); build with
#   docker build -t ghcr.io/kernelgate/kernelgate:0.1.0 .
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 DS_BUILD_OPS=0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY common common
COPY kernelgate kernelgate
COPY sidecar sidecar
COPY inference inference
COPY otel otel
RUN pip install --prefix=/install "torch==2.11.*" && \
    pip install --prefix=/install --no-build-isolation ".[inference,gpu]"

FROM python:3.11-slim
COPY --from=build /install /usr/local
# Non-root, read-only root filesystem in k8s: caches and temp files go to emptyDirs.
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin kernelgate
USER 10001
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HOME=/tmp PYTHONUNBUFFERED=1
ENTRYPOINT ["kernelgate"]
