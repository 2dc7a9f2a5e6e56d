"""The ``moga`` console script. Subcommands: ``bench`` (verify against dense attention, then time) and ``plan``
(a model's token count, FLOPs and attention memory for a video, see :mod:`moga.plan`). ``moga --version``."""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    from moga import __version__
    from moga.bench import add_arguments
    from moga.plan import add_arguments as add_plan_arguments

    parser = argparse.ArgumentParser(prog="moga", description="Mixture-of-Groups Attention kernels")
    parser.add_argument("--version", action="version", version=f"moga {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{bench,plan}")
    bench = sub.add_parser(
        "bench",
        help="check moga against dense attention, then time it against the baselines",
        description="Correctness check against the float64 reference, then a timing sweep of moga's "
        "backends, the MoGA layer path, dense SDPA, FlexAttention and the kernel-free recipe.",
    )
    add_arguments(bench)
    plan = sub.add_parser(
        "plan",
        help="token count, forward FLOPs and attention memory of a video model with MoGA",
        description="Whole-model forward FLOPs of a video DiT for one video (linear layers, full attention, the "
        "routed branch, the static branches) and the memory of the attention inputs and outputs; with --bench-json, "
        "the attention time predicted from measured TFLOP/s. Assumptions: see moga.plan's docstring.",
    )
    add_plan_arguments(plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        from moga.bench import run

        return run(args)
    if args.command == "plan":
        from moga.plan import run_cli

        return run_cli(args)
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse rejects unknown commands


if __name__ == "__main__":
    raise SystemExit(main())
