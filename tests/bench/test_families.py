"""Per-family adapter sizes (meta device) and the overhead timing's mechanics (on tiny stand-ins)."""

from ace_diffusers.bench import families
from ace_diffusers.integration.attach import loaded_adapters
from ace_diffusers.integration.modules import layer_shapes
from ace_diffusers.testing import random_adapter, tiny_sd_pipeline, tiny_sdxl_pipeline
from ace_diffusers.testing_transformers import (
    tiny_flux_pipeline,
    tiny_pixart_pipeline,
    tiny_sana_transformer,
    tiny_sd3_pipeline,
)


def test_the_size_table_counts_what_an_adapter_holds():
    sdxl = tiny_sdxl_pipeline().unet
    assert random_adapter(sdxl, rank=4, pooled_dim=32).num_parameters() == families.adapter_parameters(
        layer_shapes(sdxl), 4, 32
    )
    sd = tiny_sd_pipeline().unet
    assert random_adapter(sd, rank=4).num_parameters() == families.adapter_parameters(layer_shapes(sd), 4)


def test_every_family_has_its_real_layer_count_and_pooled_width():
    rows = {r["family"]: r for r in families.family_sizes()}
    assert {f: (r["layers"], r["text_width"], r["pooled"]) for f, r in rows.items()} == {
        "SD1.5": (16, 768, 0),
        "SDXL": (70, 2048, 1280),
        "SD3": (24, 1536, 2048),
        "PixArt-α": (28, 1152, 0),
        "Sana": (20, 2240, 0),
        "FLUX.1": (57, 3072, 768),
    }
    text = families.format_families(list(rows.values()), None)
    assert text.splitlines()[0].startswith("# per family") and "SD3" in text


def test_the_overhead_timing_runs_each_family_and_leaves_no_adapter(monkeypatch):
    models = {
        "SD1.5": tiny_sd_pipeline().unet,
        "SDXL": tiny_sdxl_pipeline().unet,
        "SD3": tiny_sd3_pipeline().transformer,
        "PixArt-α": tiny_pixart_pipeline().transformer,
        "Sana": tiny_sana_transformer(),
        "FLUX.1": tiny_flux_pipeline(guidance=True).transformer,
    }
    pooled = {"SD1.5": 0, "SDXL": 32, "SD3": 32, "PixArt-α": 0, "Sana": 0, "FLUX.1": 16}
    stand_ins = {f: ((lambda depth, m=m: m), pooled[f], None, "tiny stand-in") for f, m in models.items()}
    monkeypatch.setattr(families, "FAMILIES", stand_ins)
    rows = families.family_overhead(rounds=2, latent=8)
    assert [r["family"] for r in rows] == list(models)
    assert all(r["stock_s"] >= 0 and r["ace_s"] >= 0 and r["ratio"] > 0 for r in rows)
    assert all(not loaded_adapters(m) for m in models.values())
    assert "tiny stand-in" in families.format_families([], rows)
