"""Old module paths keep working for one release: they warn once and forward every name to its new home."""

import importlib
import sys
import warnings

import pytest

from ace_diffusers import _deprecated

# (old path, a name a user imported from it, the module that holds it now)
MOVED = [
    ("ace_diffusers.adapter", "ACEAdapter", "ace_diffusers.core.adapter"),
    ("ace_diffusers.adapter", "LayerFactors", "ace_diffusers.core.factors"),
    ("ace_diffusers.adapter", "CONFIG_NAME", "ace_diffusers.format"),
    ("ace_diffusers.processor", "ACEAttnProcessor", "ace_diffusers.core.processor"),
    ("ace_diffusers.attach", "attach_adapter", "ace_diffusers.integration.attach"),
    ("ace_diffusers.attach", "layer_shapes", "ace_diffusers.integration.modules"),
    ("ace_diffusers.compat", "base_processor", "ace_diffusers.integration.compat"),
    ("ace_diffusers.text", "TextEmbedder", "ace_diffusers.fitting.text"),
    ("ace_diffusers.presets", "resolve_spec", "ace_diffusers.fitting.presets"),
    ("ace_diffusers.embedding_cache", "cache_root", "ace_diffusers.fitting.embedding_cache"),
    ("ace_diffusers.closed_form", "erase_concept", "ace_diffusers.fitting.erase"),
    ("ace_diffusers.closed_form", "FitSettings", "ace_diffusers.fitting.data"),
    ("ace_diffusers.closed_form", "fit_gate", "ace_diffusers.fitting.solvers"),
    ("ace_diffusers.trainer", "ACETrainer", "ace_diffusers.fitting.trainer"),
    ("ace_diffusers.fuse", "fuse_adapter", "ace_diffusers.deploy.fuse"),
    ("ace_diffusers.fuse", "bake", "ace_diffusers.deploy.bake"),
    ("ace_diffusers.fuse", "fidelity", "ace_diffusers.deploy.fidelity"),
    ("ace_diffusers.export", "save_lora", "ace_diffusers.deploy.export"),
    ("ace_diffusers.cli_erase", "build_parser", "ace_diffusers.cli.erase"),
    ("ace_diffusers.demo", "main", "ace_diffusers.cli.demo"),
    ("ace_diffusers.docs_figures", "method_figure_data", "ace_diffusers.bench.method_figure"),
    ("ace_diffusers.bench.baselines", "uce_erase", "ace_diffusers.eval.baselines"),
]


@pytest.mark.parametrize("old, name, new", MOVED, ids=[f"{o}.{n}" for o, n, _ in MOVED])
def test_old_paths_warn_and_forward(old, name, new):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)


def test_unknown_names_say_where_the_module_went():
    sys.modules.pop("ace_diffusers.closed_form", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = importlib.import_module("ace_diffusers.closed_form")
    with pytest.raises(AttributeError, match="moved to ace_diffusers.fitting.closed_form"):
        module.no_such_name  # noqa: B018


def test_the_warning_names_the_release_that_removes_the_path():
    with pytest.warns(DeprecationWarning, match=_deprecated.REMOVED_IN):
        _deprecated.alias("ace_diffusers.old", "ace_diffusers.new")
