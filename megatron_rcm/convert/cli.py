"""Entry points that megatron_rcm/cli.py wires as the ``convert`` subcommand."""
from .diffusers_wan import add_convert_arguments, convert_main, run_convert

__all__ = ["add_convert_arguments", "run_convert", "convert_main"]
