"""The `mlfe` command line: thin argument parsing that hands off to each part's own entry point."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _add_score_server(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("score-server", help="run the replica inference server")
    p.add_argument("--entry-script", required=True, help="Python file defining init() and run()")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5001)


DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the router, its local replicas and the autoscaler")
    p.add_argument("--config", required=True, help="YAML configuration file")
    p = sub.add_parser("up", help="`serve` with friendly output (default: the bundled example)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML configuration file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlfe", description=__doc__)
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_score_server(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "score-server":
        from deploy.score_server import run_score_server

        return run_score_server(
            entry_script=args.entry_script, host=args.host, port=args.port,
            log_level=args.log_level,
        )
    if args.command in ("serve", "up"):
        from deploy.runtime import run

        return run(args.config, log_level=args.log_level, friendly=args.command == "up")
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
