"""``convert --to-diffusers CKPT --out DIR --pipeline-from SRC``: a complete diffusers Wan pipeline folder.

Our transformer (exported by :func:`.diffusers_wan.export_diffusers`) goes to ``DIR/transformer``; the
source pipeline's ``vae/``, ``text_encoder/``, ``tokenizer/`` and ``scheduler/`` are copied (hard links
where the filesystem allows, so a 10 GB text encoder is not duplicated) and its ``model_index.json``
is written with the transformer entry pointing at ``WanTransformer3DModel``. Everything is assembled in
a temporary folder beside ``DIR`` and renamed at the end, so a failure leaves no half pipeline.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..encoders import component_dir
from ..encoders.folder import PIPELINE_INDEX
from ..utils.files import atomic_folder
from .diffusers_wan import CLASS_NAME, ConversionError, export_diffusers

COPIED = ("vae", "text_encoder", "tokenizer", "scheduler")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _check_compatible(model, source: Path) -> None:
    """The source's VAE and text encoder must fit the transformer (config.json files, nothing loaded)."""
    def config(name):
        path = source / name / "config.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ConversionError(f"cannot read {path}: {err}") from None

    z_dim, d_model = config("vae").get("z_dim"), config("text_encoder").get("d_model")
    if z_dim is not None and int(z_dim) != model.cfg.in_channels:
        raise ConversionError(f"{source}/vae makes {z_dim} latent channels but the model's in_channels = "
                              f"{model.cfg.in_channels}: take --pipeline-from a pipeline of the same Wan family")
    if d_model is not None and int(d_model) != model.cfg.text_dim:
        raise ConversionError(f"{source}/text_encoder is {d_model} wide but the model's text_dim = "
                              f"{model.cfg.text_dim}: take --pipeline-from a pipeline of the same Wan family")


def export_pipeline(model, out, pipeline_from, max_shard_size="5GB", dtype=None,
                    drop_action_embedder: bool = False) -> Path:
    out, source = Path(out), Path(pipeline_from)
    for name in COPIED:
        component_dir(source, name, f"copied into the exported pipeline {out}")
    index_path = source / PIPELINE_INDEX
    if not index_path.is_file():
        raise ConversionError(f"{source} has no {PIPELINE_INDEX}: --pipeline-from takes a diffusers Wan pipeline "
                              "folder such as Wan2.1-T2V-1.3B-Diffusers")
    try:
        index = json.loads(index_path.read_text())
    except ValueError as err:
        raise ConversionError(f"cannot read {index_path}: {err}") from None
    _check_compatible(model, source)
    with atomic_folder(out, "pipeline") as tmp:
        export_diffusers(model, tmp / "transformer", max_shard_size=max_shard_size, dtype=dtype,
                         drop_action_embedder=drop_action_embedder)
        for name in COPIED:
            shutil.copytree(source / name, tmp / name, copy_function=_link_or_copy)
        index["transformer"] = ["diffusers", CLASS_NAME]
        (tmp / PIPELINE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return out
