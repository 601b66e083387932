"""The `mlfe` command line: thin argument parsing that hands off to each part's own entry point."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mlfe import __version__

DESCRIPTION = """\
mlfe: an inference router for models, with a co-located autoscaler, that Azure ML (AKS) users
can move to unchanged. Start with `mlfe up`: it serves the bundled example model and prints a
scoring URI, a key and a ready-to-paste curl line."""


def _add_score_server(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("score-server", help="run one model replica: the inference server that "
                       "calls your entry script's init() and run()")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--entry-script", help="Python file defining init() and run() "
                       "(default: env AZUREML_ENTRY_SCRIPT, relative to AML_APP_ROOT)")
    model.add_argument("--synthetic", metavar="SPEC",
                       help="a model stand-in for load tests instead of an entry script: JSON or "
                       "k=v,k=v, e.g. latency=lognormal:20:200,concurrency=2,error_rate=0.01,"
                       "response_bytes=512,init_ms=0,seed=1 (README: load-testing target)")
    p.add_argument("--model-dir", help="sets AZUREML_MODEL_DIR for the entry script")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=5001, help="port to listen on (0: any free one)")


def _hostport(value: str) -> str:
    from mlfe.config import parse_hostport

    try:
        parse_hostport(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("up", help="start here: serve a config (by default the bundled example) "
                       "and print each scoring URI, key and a curl line to try")
    p.add_argument("--config", help="YAML configuration file (default: the bundled iris "
                   "example, its keys and model under $XDG_DATA_HOME/mlfe or "
                   "~/.local/share/mlfe)")
    for key, what in (("listen", "the scoring port"), ("admin_listen", "the admin API"),
                      ("metrics_listen", "a metrics-only listener (GET /metrics, no token)")):
        p.add_argument("--" + key.replace("_", "-"), dest=key, type=_hostport,
                       metavar="HOST:PORT", help=f"{what} (overrides router.{key})")
    p = sub.add_parser("serve", help="run the router, its local replicas and the autoscaler "
                       "(what a container runs; like `up` without the friendly output)")
    p.add_argument("--config", required=True, help="YAML configuration file")
    # Started by `serve` when router.workers > 1; not meant to be run by hand, so not listed
    # (argparse shows a sub-command with help=SUPPRESS anyway: leave it out of the listing).
    p = sub.add_parser("worker")
    sub._choices_actions = [a for a in sub._choices_actions if a.dest != "worker"]
    p.add_argument("--config", required=True)
    p.add_argument("--broker", required=True)
    p.add_argument("--member", required=True)


def _add_cert(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("cert", help="write a TLS certificate and key for the scoring port")
    p.add_argument("--self-signed", action="store_true", required=True,
                   help="a self-signed development certificate (the only kind so far)")
    p.add_argument("--host", action="append", default=[], metavar="NAME",
                   help="DNS name or IP address to certify (repeatable); localhost and "
                   "127.0.0.1 are always added")
    p.add_argument("--out-dir", default=".mlfe/tls", help="where cert.pem and key.pem go")
    p.add_argument("--days", type=int, default=365, help="validity in days")
    p.add_argument("--force", action="store_true", help="overwrite existing files")


def _add_render(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("render", help="print the manifests of the router and the services")
    p.add_argument("--config", help="YAML configuration file (required unless --sidecar)")
    p.add_argument("--target", required=True, choices=["kubernetes"])
    p.add_argument("--namespace", help="namespace of every object (default: mlfe)")
    p.add_argument("--image", help="image of the model replicas: FROM the mlfe image, with the "
                   "config's directory at /var/azureml-app")
    p.add_argument("--router-image", help="image of the router (default: mlfe:<version>)")
    p.add_argument("--output", default="-", metavar="DIR|-",
                   help="a directory to write files into, or - for stdout (default)")
    p.add_argument("--generate-secret", action="store_true",
                   help="include the Secret mlfe-keys with fresh keys, signing key and admin "
                   "token (first install only: applying it again rotates every key)")
    p.add_argument("--monitor", choices=["service", "pod"],
                   help="also a Prometheus Operator ServiceMonitor (service) or PodMonitor (pod) "
                   "of the router's metrics port")
    p.add_argument("--sidecar", action="store_true",
                   help="instead: add mlfe as a sidecar (`mlfe sidecar`) to the Deployment of "
                   "--deployment FILE and point its pods' Service at mlfe (--router-image is "
                   "mlfe's image; --generate-secret adds the Secret of its keys)")
    p.add_argument("--deployment", metavar="FILE",
                   help="with --sidecar: a YAML file holding one Deployment (and optionally its "
                   "Service)")
    p.add_argument("--service-name", help="with --sidecar: the service name in the scoring URL "
                   "(default: the Deployment's name)")
    p.add_argument("--model-container", metavar="NAME",
                   help="with --sidecar: the model's container, if the pod has several")


def _add_import(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("import", help="turn Azure ML CLI v1 deployment (and inference) config "
                       "JSON files into an mlfe YAML configuration")
    p.add_argument("--deployment-config", required=True, metavar="FILE",
                   help="deploymentconfig.json (computeType aks or aksendpoint)")
    p.add_argument("--inference-config", metavar="FILE",
                   help="inferenceconfig.json: the entry script and environment variables")
    p.add_argument("--name", help="the service (or endpoint) name (default: the deployment "
                   "config file's name)")
    p.add_argument("--output", metavar="FILE|-", default="-",
                   help="a new file to write (owner-only), or - for stdout (default)")


def _add_sidecar(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sub.add_parser(
        "sidecar",
        help="run beside a model server in its pod: one service in front of one upstream on "
        "the pod's loopback, configured from MLFE_* environment variables (README: sidecar)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlfe", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"mlfe {__version__}")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper, help="how much the router logs (default: INFO)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(sub)
    _add_score_server(sub)
    _add_sidecar(sub)
    _add_cert(sub)
    _add_render(sub)
    _add_import(sub)
    from deploy.admin_client import add_admin_commands
    add_admin_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import os

    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.command == "score-server" and args.synthetic is None and args.entry_script is None
            and not os.environ.get("AZUREML_ENTRY_SCRIPT", "").strip()):
        parser.error("score-server: one of --entry-script (or env AZUREML_ENTRY_SCRIPT) "
                     "and --synthetic is required")
    if args.command == "score-server" and args.synthetic is not None:
        from deploy.synthetic import run_synthetic_server

        return run_synthetic_server(
            spec=args.synthetic, host=args.host, port=args.port, log_level=args.log_level
        )
    if args.command == "score-server":
        from deploy.score_server import run_score_server

        if args.model_dir is not None:
            os.environ["AZUREML_MODEL_DIR"] = str(Path(args.model_dir).resolve())

        return run_score_server(
            entry_script=args.entry_script, host=args.host, port=args.port,
            log_level=args.log_level,
        )
    if args.command in ("serve", "up"):
        from deploy.runtime import run

        overrides = {k: getattr(args, k) for k in ("listen", "admin_listen", "metrics_listen")
                     if getattr(args, k, None) is not None}
        return run(args.config, log_level=args.log_level, friendly=args.command == "up",
                   router_overrides=overrides)
    if args.command == "worker":
        from deploy.workers import run_worker

        return run_worker(args.config, args.broker, args.member, log_level=args.log_level)
    if args.command == "sidecar":
        from deploy.sidecar import run_sidecar

        return run_sidecar(log_level=args.log_level)
    if hasattr(args, "admin_handler"):
        from deploy.admin_client import run_admin_command

        return run_admin_command(args)
    if args.command == "cert":
        from deploy.certs import run_cert

        return run_cert(
            self_signed_=args.self_signed, hosts=args.host, out_dir=args.out_dir,
            days=args.days, force=args.force,
        )
    if args.command == "import":
        from deploy.import_azureml import run_import

        return run_import(args.deployment_config, args.inference_config, args.name, args.output)
    if args.command == "render" and args.sidecar:
        from deploy.render import run_render_sidecar

        if (args.deployment is None or args.config is not None or args.image is not None
                or args.monitor is not None):
            print("mlfe render: --sidecar takes --deployment FILE, and neither --config, "
                  "--image nor --monitor", file=sys.stderr)
            return 2
        return run_render_sidecar(
            deployment=args.deployment, target=args.target, namespace=args.namespace,
            image=args.router_image, service_name=args.service_name,
            model_container=args.model_container, output=args.output,
            generate_secret=args.generate_secret,
        )
    if args.command == "render":
        from deploy.render import run_render

        if args.config is None or args.deployment is not None:
            print("mlfe render: --config FILE is required (or --sidecar --deployment FILE)",
                  file=sys.stderr)
            return 2
        return run_render(
            config=args.config, target=args.target, namespace=args.namespace, image=args.image,
            router_image=args.router_image, output=args.output,
            generate_secret=args.generate_secret, monitor=args.monitor,
        )
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
