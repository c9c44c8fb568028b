"""The `evlgen` command line: the only place that configures logging and seeds.

Subcommands:
  info PRESET [key=value ...] [--json]   token schedule, connector MACs, parameter counts (offline)
  presets                                list the shipped presets
  smoke [--out DIR]                      tiny end-to-end check: train, generate, save, reload
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from evlgen.config import ConfigError, list_presets, load_config


def _info(args: argparse.Namespace) -> int:
    from evlgen.model.build import describe

    cfg = load_config(args.config, args.overrides)
    info = describe(cfg)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    sched = info["token_schedule"]
    print(f"preset            {info['preset']}")
    print(f"visual tokens     {info['visual_tokens']} ({info['protected_tokens']} protected)")
    print(f"merge r per layer {info['merge_schedule']}")
    print(f"token schedule    {' -> '.join(map(str, sched))}  (LLM sees {sched[-1]})")
    print(f"connector MACs    {info['connector_macs'] / 1e9:.2f} G per image (linear layers)")
    print(f"projection MACs   {info['projection_macs'] / 1e9:.3f} G per image")
    print(f"trainable params  {info['trainable_params']:,}")
    print(f"frozen params     {info['frozen_params']:,}")
    for name, part in info["parts"].items():
        print(f"  {name:<14}  trainable {part['trainable']:>14,}  frozen {part['frozen']:>16,}")
    return 0


def _presets(args: argparse.Namespace) -> int:
    print("\n".join(list_presets()))
    return 0


def _smoke(args: argparse.Namespace) -> int:
    from evlgen.smoke import run_smoke

    return run_smoke(args.out, steps=args.steps, preset=args.config, overrides=args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evlgen",
        description="Train visually conditioned language generation models the EVLGen way.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="token schedule, connector MACs and parameter counts (no download)")
    p.add_argument("config", help="preset name (see `evlgen presets`) or YAML path")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. connector.r=16")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_info)

    p = sub.add_parser("presets", help="list shipped presets")
    p.set_defaults(func=_presets)

    p = sub.add_parser("smoke", help="tiny end-to-end check on CPU: train, generate, save, reload")
    p.add_argument("config", nargs="?", default="tiny", help="preset (default: tiny)")
    p.add_argument("overrides", nargs="*", help="dotted overrides")
    p.add_argument("--out", default="runs/smoke", help="output directory")
    p.add_argument("--steps", type=int, default=30)
    p.set_defaults(func=_smoke)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"evlgen: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
