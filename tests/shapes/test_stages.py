"""The training stages' math: the v-prediction target and weight, the classifier's masked loss."""

import torch

from ace_diffusers.shapes.classifier import ShapesClassifier
from ace_diffusers.shapes.pipeline import make_scheduler
from ace_diffusers.shapes.stages import random_blur, v_target_and_weight


def test_zero_terminal_snr_leaves_no_image_at_the_last_step():
    abar = make_scheduler().alphas_cumprod.float()
    assert abar[-1] == 0 and abar[0] > 0.99
    z0, noise = torch.randn(4, 4, 8, 16), torch.randn(4, 4, 8, 16)
    t = torch.tensor([0, 300, 700, len(abar) - 1])
    zt, v, w = v_target_and_weight(z0, noise, t, abar, min_snr=5.0)
    assert torch.allclose(zt[3], noise[3]) and torch.allclose(v[3], -z0[3])  # pure noise; v = -z0
    a = abar[t].view(-1, 1, 1, 1)
    assert torch.allclose(a.sqrt() * zt - (1 - a).sqrt() * v, z0, atol=1e-5)  # v recovers the image
    assert w[3] == 1 and (w > 0).all() and (w <= 1 + 1e-6).all()


def test_blur_keeps_shape_and_range():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 32, 32)
    y = random_blur(x, g)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1



def test_slot_accuracy_scores_colour_and_style_only_where_a_shape_is_drawn():
    from ace_diffusers.shapes.render import render_dataset
    from ace_diffusers.shapes.stages import slot_accuracy

    scenes = render_dataset(20, seed=1, kind="blank")
    model = ShapesClassifier(width=8)
    acc = slot_accuracy(model, {**scenes})
    assert 0 <= acc["shape"] <= 1 and acc["colour"] != acc["colour"]  # no drawn slot: colour is NaN
