"""Checkpoint conversion between our CausalWanModel and diffusers' WanTransformer3DModel.

Names load on first use (torch and the models are heavy; ``convert.cli`` must stay instant to import)."""
_LAZY = {"diffusers_config_from_model": "diffusers_wan", "export_diffusers": "diffusers_wan",
         "import_diffusers": "diffusers_wan", "load_diffusers_state_dict": "diffusers_wan",
         "model_config_from_diffusers": "diffusers_wan", "load_model_checkpoint": "native",
         "save_model_checkpoint": "native", "add_convert_arguments": "cli", "run_convert": "cli"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
