"""The ``convert`` subcommand: its arguments (torch-free, so ``megatron-rcm --help`` is instant) and its runner."""
from __future__ import annotations

import argparse

from ..config.model import PARAM_DTYPES


def add_convert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``megatron-rcm convert``; pair with :func:`run_convert`."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-diffusers", metavar="DIR", help="diffusers WanTransformer3DModel folder -> our CKPT")
    src.add_argument("--to-diffusers", metavar="CKPT", help="our CKPT (.safetensors + .json sidecar, or a sharded "
                     "training checkpoint folder of any parallel layout: step_* or its checkpoints/ root) "
                     "-> diffusers DIR")
    parser.add_argument("--out", required=True, help="output CKPT file or diffusers folder")
    parser.add_argument("--dtype", choices=sorted(PARAM_DTYPES), default=None, help="cast weights (default: keep)")
    parser.add_argument("--max-shard-size", default="5GB", help="diffusers shard size, e.g. 5GB, 500MB, bytes")
    parser.add_argument("--action-dim", type=int, default=0, help="on import: add a zero-init action embedder")
    parser.add_argument("--text-len", type=int, default=None, help="on import: text context length (default 512)")
    parser.add_argument("--drop-action-embedder", action="store_true", help="on export: drop action weights")
    parser.add_argument("--weights", default="ema", help="on export from a sharded checkpoint: which weights "
                        "(ema, model, or another saved group such as critic); default ema")
    parser.add_argument("--pipeline-from", metavar="DIR_SRC", default=None, help="on export: write a complete "
                        "diffusers WanPipeline folder, taking vae/, text_encoder/, tokenizer/, scheduler/ and "
                        "model_index.json from this pipeline folder")
    return parser


def run_convert(ns: argparse.Namespace) -> int:
    from .diffusers_wan import run_convert as run

    return run(ns)


def convert_main(argv=None) -> int:
    parser = add_convert_arguments(argparse.ArgumentParser(prog="megatron-rcm convert"))
    return run_convert(parser.parse_args(argv))


__all__ = ["add_convert_arguments", "run_convert", "convert_main"]
