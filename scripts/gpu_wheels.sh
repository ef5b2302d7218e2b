#!/usr/bin/env bash
# Prepares the Python wheels a GPU machine needs to run kernelgate's inference server, its
# tracing and its GPU benchmarks, from the project's pins (pyproject.toml), for a machine that
# cannot reach any registry (the device machines: Python 3.12, x86-64, torch 2.11+cu130, numpy,
# aiohttp, grpcio, prometheus-client, pyyaml, safetensors ... preinstalled).
#
#   scripts/gpu_wheels.sh [WHEEL_DIR]        # default: <repo>/.whl (git-ignored)
#
# What it carries, and why (everything else the code imports is already on the image):
#   transformers 4.56.x (DeepSpeed 0.19.8 needs it; the image has 5.x) with tokenizers 0.22.x and
#     huggingface-hub < 1.0 (the image's tokenizers 0.23.2 and hub 1.x are outside transformers' bounds);
#   deepspeed 0.19.8 as a pure-Python wheel (DS_BUILD_OPS=0: its CUDA ops are JIT-built on the
#     device; the wheel records no prebuilt op, so none is checked against a build-time torch),
#     with hjson and pydantic 2 (pydantic-core, annotated-types, typing-inspection,
#     typing-extensions >= 4.16);
#   the OpenTelemetry SDK and OTLP exporters at the 1.45 pin (api, sdk, semantic-conventions,
#     exporter-otlp(-proto-grpc/-http/-proto-common), exporter-otlp-common,
#     exporter-http-transport, proto), googleapis-common-protos and the protobuf they need;
#   cupti-python 13.0.x (its CUDA major and libcupti match torch's cu130 nvidia-cuda-cupti) and
#     pyelftools (needed by the 13.4 line; harmless on 13.0);
#   envoy-data-plane (betterproto2, grpclib, h2, hpack, hyperframe): `kernelgate.cli serve` loads
#     the whole config through kernelgate.config, which imports the Envoy config types;
#   pytest-asyncio and jsonschema (with referencing, jsonschema-specifications, rpds-py) for the GPU
#     tests, `pytest -m gpu tests/inference tests/otel` (pytest itself is on the image).
#
# pip resolves the set once for cp312/manylinux x86-64 so the versions agree with each other;
# wheels of packages the image already has at a usable version are dropped (DEVICE_HAS below,
# from /work/.library/device/KINDS.md), except those whose image version is out of bounds
# (ALWAYS_CARRY). One version of each package is kept in WHEEL_DIR: a wheel of another version
# of a package this script carries is replaced; wheels of other packages are left alone.
# Finally every requirement of every carried wheel is checked to be satisfied by a carried
# wheel or by the image, so a missing dependency fails here, not on the device.
#
# On the device, each command starts with the prefix this script prints last:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# (with `carry: [".whl", ...]` in the device call). scripts/gpu_bench.sh runs the GPU benchmarks.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/.whl}"
PY="${PYTHON:-python3}"
STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
log() { printf '[gpu-wheels] %s\n' "$*" >&2; }

# The roots, at the project's pins (pyproject.toml [project.dependencies] and the inference/gpu
# extras). Transitive requirements are resolved by pip.
ROOTS=(
  "transformers==4.56.*"
  "hjson" "pydantic>=2.0.0"                      # deepspeed 0.19.8's requirements the image lacks
  "opentelemetry-api==1.45.*" "opentelemetry-sdk==1.45.*" "opentelemetry-exporter-otlp==1.45.*"
  "cupti-python==13.0.*" "pyelftools"
  "envoy-data-plane==2.2.*"                      # kernelgate.config (the CLI's one loader) imports it
  "llguidance==1.9.*"                            # response_format json_object/json_schema (inference/structured.py)
  "orjson==3.11.*"                               # the OpenAI endpoints' JSON bodies and SSE events (inference/openai/http.py)
  "httptools==0.9.*"                             # kernelgate.config -> envoy_config -> sidecar/http_transport imports it
  "pytest-asyncio==1.5.*" "jsonschema==4.*"      # the GPU tests (pytest -m gpu): async fixtures, schema checks
)
DEEPSPEED_SPEC="deepspeed==0.19.8"
# Packages on the device image (KINDS.md "Python packages already there", 2026-11-17), whose
# versions satisfy what the carried wheels ask for.
DEVICE_HAS="accelerate aiohttp aiosignal aiohappyeyeballs attrs certifi charset-normalizer cuda-bindings
cuda-pathfinder cuda-toolkit einops filelock frozenlist fsspec grpcio hf-xet idna jinja2 markupsafe
msgpack multidict networkx ninja numpy nvidia-cuda-cupti nvidia-ml-py packaging pillow
prometheus-client propcache psutil py-cpuinfo python-dateutil pyyaml regex requests safetensors six sympy
torch tqdm triton tzdata urllib3 uvloop wrapt yarl zipp"
# On the image, but at a version outside the bounds of what we carry: always carried.
ALWAYS_CARRY="huggingface-hub tokenizers typing-extensions protobuf"
# The image is Ubuntu 24.04 (glibc 2.39): any manylinux tag up to 2_39 runs there.
PLATFORMS=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for n in $(seq 17 39); do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done

log "resolving ${#ROOTS[@]} roots for cp312 manylinux x86-64"
"$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  "${PLATFORMS[@]}" -d "$STAGE/resolved" "${ROOTS[@]}"

log "building $DEEPSPEED_SPEC as a pure-Python wheel (DS_BUILD_OPS=0)"
"$PY" -m venv "$STAGE/build-venv"
"$STAGE/build-venv/bin/pip" install -q setuptools wheel
DS_BUILD_OPS=0 "$STAGE/build-venv/bin/pip" wheel -q --no-deps --no-build-isolation -w "$STAGE/resolved" "$DEEPSPEED_SPEC"

mkdir -p "$DEST"
# Select, check and install into DEST (one version per package).
"$PY" - "$STAGE/resolved" "$DEST" "$DEVICE_HAS" "$ALWAYS_CARRY" <<'EOF'
import email.parser, re, shutil, sys, zipfile
from pathlib import Path
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename
from pip._vendor.packaging.version import Version

stage, dest = Path(sys.argv[1]), Path(sys.argv[2])
device_has = {canonicalize_name(n) for n in sys.argv[3].split()}
always = {canonicalize_name(n) for n in sys.argv[4].split()}
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}

def meta(path):
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(zf.read(name).decode())

carried = {}
for whl in sorted(stage.glob("*.whl")):
    name, version, _, _ = parse_wheel_filename(whl.name)
    if name in device_has and name not in always:
        continue
    carried[name] = (version, whl)

# Every requirement of every carried wheel: satisfied by a carried version, or on the image.
missing = []
for name, (version, whl) in carried.items():
    for line in meta(whl).get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        dep = canonicalize_name(req.name)
        if dep in carried:
            if not req.specifier.contains(carried[dep][0], prereleases=True):
                missing.append(f"{name} needs {line}, carried {dep} {carried[dep][0]}")
        elif dep not in device_has:
            missing.append(f"{name} needs {line}: neither carried nor on the device image")
if missing:
    sys.exit("gpu_wheels: unmet requirements:\n  " + "\n  ".join(missing))

for name, (version, whl) in sorted(carried.items()):
    for old in dest.glob("*.whl"):
        oname, oversion, _, _ = parse_wheel_filename(old.name)
        if oname == name and old.name != whl.name:
            print(f"[gpu-wheels] replacing {old.name} (another version of {name})", file=sys.stderr)
            old.unlink()
    if not (dest / whl.name).exists():
        shutil.copy2(whl, dest / whl.name)
    print(f"{name}=={version}")
EOF
size=$(du -sm "$DEST" | cut -f1)
log "$DEST: $(ls "$DEST"/*.whl | wc -l) wheels, ${size} MiB (a device call carries at most 64 MiB in all)"
date -u +%FT%TZ >"$DEST/READY"
cat >&2 <<EOF
[gpu-wheels] device command prefix (device call with carry: [".whl", ...]):
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:\$PWD
EOF
