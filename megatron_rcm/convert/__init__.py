"""Checkpoint conversion between our CausalWanModel and diffusers' WanTransformer3DModel."""
from .diffusers_wan import (add_convert_arguments, diffusers_config_from_model, export_diffusers, import_diffusers,
                            load_diffusers_state_dict, model_config_from_diffusers, run_convert)
from .native import load_model_checkpoint, save_model_checkpoint

__all__ = ["add_convert_arguments", "diffusers_config_from_model", "export_diffusers", "import_diffusers",
           "load_diffusers_state_dict", "model_config_from_diffusers", "run_convert", "load_model_checkpoint",
           "save_model_checkpoint"]
