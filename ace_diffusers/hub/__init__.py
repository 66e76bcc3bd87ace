"""Hugging Face Hub I/O for ACE adapters: download (:mod:`.download`), model cards (:mod:`.card`),
publishing (:mod:`.push`).

An ACE adapter on the Hub is an ordinary model repo holding the two files written by
:meth:`ACEAdapter.save_pretrained` (``ace_adapter.safetensors`` + ``ace_config.json``), a ``README.md``
model card (``library_name: ace-diffusers``) and optionally sample images. This package reads the file
format (:mod:`ace_diffusers.format`), never the adapter class, so the adapter can use it.
"""

from ..format import CONFIG_NAME, WEIGHTS_NAME
from .card import REPO_ID_PLACEHOLDER, build_model_card
from .common import LIBRARY_NAME
from .download import resolve_adapter_dir
from .push import IMAGE_SUFFIXES, push_adapter_folder

__all__ = [
    "CONFIG_NAME",
    "IMAGE_SUFFIXES",
    "LIBRARY_NAME",
    "REPO_ID_PLACEHOLDER",
    "WEIGHTS_NAME",
    "build_model_card",
    "push_adapter_folder",
    "resolve_adapter_dir",
]
