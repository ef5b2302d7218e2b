"""``kernelgate``: one CLI for every process of the pod.

    kernelgate authz        the ext_authz sidecar (gRPC)
    kernelgate serve        the inference server (HTTP, OpenAI-style)
    kernelgate up           the whole local stack on loopback
    kernelgate envoy-config the Envoy bootstrap used by the stack, the tests and k8s
    kernelgate inject       add the sidecar containers to a Kubernetes manifest
    kernelgate build-policy compile the policy to a Wasm bundle for in-process evaluation
    kernelgate hash-key     the stored form of an API key
    kernelgate models       load / activate / unload / status of model versions (the admin API)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

import yaml

from common.settings import ConfigError
from common.version import __version__


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _load(args: argparse.Namespace):
    from kernelgate.config import load

    return load(args.config)


def cmd_authz(args: argparse.Namespace) -> int:
    config = _load(args)
    from otel.setup import configure_tracing
    from sidecar.server import run

    with configure_tracing(config.telemetry, "kernelgate-authz"):
        run(config.authz)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args)
    from inference.server import run
    from inference.tracing import Tracing
    from otel.setup import configure_metrics, configure_tracing, kernel_tracing

    with configure_tracing(config.telemetry, "kernelgate-inference"), \
            configure_metrics(config.telemetry, "kernelgate-inference"), kernel_tracing(config.telemetry) as kernels:
        run(config.inference, Tracing(request_observer=kernels,
                                     decode_step_spans_every=config.telemetry.decode_step_spans_every), kernels)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from kernelgate.stack import run_stack

    return run_stack(_load(args), args.config, replicas=args.replicas)


def cmd_envoy_config(args: argparse.Namespace) -> int:
    from kernelgate.envoy_config import render

    config = _load(args)
    text = yaml.safe_dump(render(config.envoy), sort_keys=False) if args.format == "yaml" \
        else json.dumps(render(config.envoy), indent=2) + "\n"
    if args.output and args.output != "-":
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_inject(args: argparse.Namespace) -> int:
    from kernelgate.inject import InjectError, inject_stream

    source = sys.stdin if args.filename == "-" else open(args.filename, encoding="utf-8")  # noqa: SIM115
    try:
        sys.stdout.write(inject_stream(source.read()))
    except InjectError as exc:
        print(f"kernelgate inject: {exc}", file=sys.stderr)
        return 2
    finally:
        if source is not sys.stdin:
            source.close()
    return 0


def cmd_build_policy(args: argparse.Namespace) -> int:
    from kernelgate.policy_bundle import build_wasm_bundle

    config = _load(args)
    source = args.policies or config.stack.policies_dir
    output = build_wasm_bundle(source, args.output, config.authz.opa.policy_path)
    print(f"wrote {output} (entrypoint {config.authz.opa.policy_path}); serve it with "
          f"authz.opa.mode: wasm and authz.opa.wasm_bundle_file: {output}")
    return 0


def cmd_hash_key(args: argparse.Namespace) -> int:
    from sidecar.identity import hash_api_key

    key = args.key if args.key != "-" else sys.stdin.readline().strip()
    entry = {hash_api_key(key): {"tenant": args.tenant, "tier": args.tier, "scopes": args.scopes,
                                 "name": args.name or args.tenant}}
    sys.stdout.write(yaml.safe_dump(entry, sort_keys=False))
    return 0


def _admin_call(args: argparse.Namespace, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """One call to the inference server's admin API (address and token from the config)."""
    import urllib.error
    import urllib.request

    from inference.models.admin import read_token

    admin = _load(args).inference.admin
    token = read_token(admin)
    if token is None:
        raise SystemExit(f"kernelgate: no admin token (inference.admin.token_file or ${admin.token_env})")
    url = args.admin_url or f"http://{admin.host}:{admin.port}"
    request = urllib.request.Request(f"{url}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def cmd_models(args: argparse.Namespace) -> int:
    import time

    if args.action == "status":
        status, body = _admin_call(args, "GET", "/admin/models")
    elif args.action == "load":
        spec: dict = {"version": args.version, "activate": args.activate, "seed": args.seed}
        if args.path:
            spec["path"] = args.path
        else:
            spec["random_config"] = args.random_config
        status, body = _admin_call(args, "POST", f"/admin/models/{args.model}/versions", spec)
        deadline = time.monotonic() + args.wait
        while status == 202 and body.get("state") in ("loading", "validating") and time.monotonic() < deadline:
            time.sleep(0.5)
            _, listing = _admin_call(args, "GET", "/admin/models")
            body = next(v for m in listing["models"] if m["name"] == args.model for v in m["versions"]
                        if v["version"] == args.version)
        if body.get("state") == "failed":
            status = 422
    elif args.action == "activate":
        status, body = _admin_call(args, "POST", f"/admin/models/{args.model}/versions/{args.version}/activate")
    else:
        status, body = _admin_call(args, "DELETE", f"/admin/models/{args.model}/versions/{args.version}")
    print(json.dumps(body, indent=2))
    return 0 if status < 300 else 1


def cmd_validate(args: argparse.Namespace) -> int:
    _load(args)
    print(f"{args.config or '(defaults)'}: OK")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kernelgate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"kernelgate {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("KERNELGATE_LOG_LEVEL", "info"))
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("-c", "--config", default=os.environ.get("KERNELGATE_CONFIG"),
                       help="YAML config file (env KERNELGATE_CONFIG); KERNELGATE__SECTION__KEY=value overrides")
        return p

    with_config(sub.add_parser("authz", help="run the ext_authz sidecar")).set_defaults(func=cmd_authz)
    with_config(sub.add_parser("serve", help="run the inference server")).set_defaults(func=cmd_serve)
    p = with_config(sub.add_parser("up", help="run the local stack (OPA, sidecar, inference, Envoy, Jaeger)"))
    p.add_argument("--replicas", type=_positive_int, default=1,
                   help="inference servers behind Envoy (one per GPU when there are several)")
    p.set_defaults(func=cmd_up)
    p = with_config(sub.add_parser("envoy-config", help="print the Envoy bootstrap"))
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.add_argument("--format", choices=["yaml", "json"], default="yaml")
    p.set_defaults(func=cmd_envoy_config)
    p = sub.add_parser("inject", help="add kernelgate's containers to a Deployment/StatefulSet/Pod manifest")
    p.add_argument("-f", "--filename", default="-", help="manifest file, or - for stdin")
    p.set_defaults(func=cmd_inject)
    p = with_config(sub.add_parser("build-policy", help="compile policies/ to a Wasm bundle (opa build -t wasm)"))
    p.add_argument("-o", "--output", default="policy-bundle.tar.gz")
    p.add_argument("--policies", help="policy directory (default: stack.policies_dir)")
    p.set_defaults(func=cmd_build_policy)
    p = sub.add_parser("hash-key", help="print the api_keys_file entry for an API key")
    p.add_argument("key", help="the API key, or - to read it from stdin (keeps it out of shell history)")
    p.add_argument("--tenant", required=True)
    p.add_argument("--tier", default="free")
    p.add_argument("--scopes", nargs="*", default=["completions", "embeddings", "models"])
    p.add_argument("--name")
    p.set_defaults(func=cmd_hash_key)
    with_config(sub.add_parser("validate-config", help="load and validate a config file")
                ).set_defaults(func=cmd_validate)
    models = sub.add_parser("models", help="model versions: load, activate, unload, status (the admin API)")
    actions = models.add_subparsers(dest="action", required=True)
    for action in ("status", "load", "activate", "unload"):
        p = with_config(actions.add_parser(action))
        p.add_argument("--admin-url", help="admin API base URL (default: inference.admin host:port)")
        if action != "status":
            p.add_argument("model")
            p.add_argument("version")
        if action == "load":
            p.add_argument("--path", help="a local Hugging Face directory")
            p.add_argument("--random-config", default="tiny-gpt2", help="a named random-weight architecture")
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--activate", action="store_true", help="activate once validated")
            p.add_argument("--wait", type=float, default=300.0, help="seconds to wait for validation (0: return)")
        p.set_defaults(func=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.log_level)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"kernelgate: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"kernelgate: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
