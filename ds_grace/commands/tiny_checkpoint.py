"""`ds-grace tiny-checkpoint FAMILY OUT`: a small random checkpoint of a supported family, to try the
whole journey (profile, plan, launch) without downloading a model."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ds_grace.models.adapters import HF_FAMILIES

    parser.add_argument("family", choices=HF_FAMILIES, help="model family")
    parser.add_argument("out", help="folder to write (config.json + model.safetensors)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")


def run(args: argparse.Namespace) -> int:
    from ds_grace.models import tiny_checkpoint, tiny_config

    path = tiny_checkpoint(args.family, args.out, seed=args.seed)
    config = tiny_config(args.family)
    print(
        json.dumps({"out": str(path), "family": args.family, "num_hidden_layers": config.num_hidden_layers})
    )
    return 0
