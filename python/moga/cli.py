"""The ``moga`` console script. Subcommands: ``bench`` (verify against dense attention, then time)."""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    from moga.bench import add_arguments

    parser = argparse.ArgumentParser(prog="moga", description="Mixture-of-Groups Attention kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser(
        "bench",
        help="check moga against dense attention, then time it against the baselines",
        description="Correctness check against the float64 reference, then a timing sweep of moga's "
        "backends, the MoGA layer path, dense SDPA, FlexAttention and the kernel-free recipe.",
    )
    add_arguments(bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        from moga.bench import run

        return run(args)
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse rejects unknown commands


if __name__ == "__main__":
    raise SystemExit(main())
