"""``python -m ember {info,bench,demo,compile-check}``."""
from __future__ import annotations

import argparse
import sys


def _info(_args) -> int:
    from .info import describe

    print(describe())
    return 0


def _bench(args) -> int:
    from .bench import main as bench_main

    return bench_main(args.rest)


def _demo(args) -> int:
    from .demo import main as demo_main

    return demo_main(args.rest)


def _compile_check(args) -> int:
    from .compile_check import main as compile_check_main

    return compile_check_main(args.rest)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ember", description="ember: fused kernels for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="what was built and which backends are live here").set_defaults(fn=_info)
    for name, fn, text in (
        ("bench", _bench, "kernel benchmark suite (see `python -m ember bench --help`)"),
        ("demo", _demo, "swap ember into a real model; print speed and output difference"),
        ("compile-check", _compile_check, "compile every Triton and CUDA kernel for sm_90a / sm_80 without a GPU"),
    ):
        sub.add_parser(name, help=text, add_help=False).set_defaults(fn=fn)
    # bench/demo/compile-check own their options: everything after the sub-command is passed on untouched
    args, rest = parser.parse_known_args(argv)
    args.rest = rest
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
