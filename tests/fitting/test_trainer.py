import math

import pytest
import torch

from ace_diffusers.core.adapter import ACEAdapter
from ace_diffusers.errors import ACEValueError
from ace_diffusers.fitting import batches
from ace_diffusers.fitting.closed_form import fit_adapter
from ace_diffusers.fitting.data import FitSettings
from ace_diffusers.fitting.presets import resolve_spec
from ace_diffusers.fitting.trainer import LOSS_READ_EVERY, ACETrainer
from ace_diffusers.fitting.trainer_args import MAX_DEFAULT_STEPS, default_steps
from ace_diffusers.testing import tiny_sd_pipeline


def small_trainer(pipe, **kwargs):
    defaults = dict(
        kind="style",
        steps=12,
        adversarial_every=5,
        adversarial_steps=2,
        mined_synonyms=2,
        dictionary=False,  # the English dictionary: tests/fitting/test_vocabulary.py, tests/shapes
        queries_per_layer=16,
        batch_size=8,
        progress=False,
    )
    return ACETrainer(pipe, "Van Gogh", **{**defaults, **kwargs})


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline()


def test_fit_starts_from_closed_form_and_reduces_the_loss(pipe):
    trainer = small_trainer(pipe, steps=25)
    adapter = trainer.fit()
    assert isinstance(adapter, ACEAdapter) and adapter.method == "ace"
    assert adapter.concepts == ["Van Gogh"] and adapter.neutral == ["art"]
    tuning = adapter.fit["fine_tuning"]
    # mining keeps at most mined_synonyms words, and only those that pass its in-context checks (a random
    # tiny model has few; tests/shapes/test_trainer_mining.py checks what it finds on a real encoder)
    assert (
        tuning["steps_run"] == 25
        and tuning["adversaries_found"] >= 1
        and 1 <= len(tuning["mined_synonyms"]) <= 2
        and tuning["adversarial_radius"] == 0.25
    )
    assert tuning["erase_loss_after"] < 0.8 * tuning["erase_loss_before"]  # on the fixed concept prompts
    assert pipe.get_list_ace_adapters() == []  # fitting does not load anything
    # where the time went: every phase, in order, within the fit's wall time
    phases = tuning["phase_seconds"]
    assert list(phases) == ["query capture", "mining", "closed form", "training set", "adversaries", "steps"]
    assert sum(phases.values()) <= adapter.fit["seconds"] + 1e-3


def test_fit_leaves_no_gradient_on_the_pipeline(pipe):
    """Only the adapter is trained: the UNet's and text encoder's weights (which require grad in a
    freshly built pipeline) get no .grad, so no memory is left behind on a user's model."""
    assert any(p.requires_grad for p in pipe.unet.parameters())
    small_trainer(pipe, steps=6, adversarial_every=2).fit()
    for model in (pipe.unet, pipe.text_encoder):
        assert all(p.grad is None for p in model.parameters())


def test_kept_projections_change_nothing_but_speed(pipe, monkeypatch):
    """Keeping every training prompt's unedited keys/values (below the memory cap) trains the same
    adapter as recomputing them at every step (above it)."""
    kept = small_trainer(pipe, seed=5).fit().state_dict()
    monkeypatch.setattr(batches, "KEPT_PROJECTIONS_BYTES", 0)
    recomputed = small_trainer(pipe, seed=5).fit().state_dict()
    for key, tensor in kept.items():
        torch.testing.assert_close(recomputed[key], tensor, rtol=1e-4, atol=1e-6)


def test_zero_steps_returns_the_closed_form_solution(pipe):
    adapter = small_trainer(pipe, steps=0, mined_synonyms=0).fit()
    closed = fit_adapter(pipe, resolve_spec("Van Gogh", kind="style"), FitSettings(neighbours=0))
    for name, factors in closed.layers.items():
        for key, tensor in factors.tensors().items():
            torch.testing.assert_close(adapter.layers[name].tensors()[key], tensor)


def test_same_seed_same_adapter_other_seed_differs(pipe):
    a = small_trainer(pipe, seed=3).fit().state_dict()
    b = small_trainer(pipe, seed=3).fit().state_dict()
    c = small_trainer(pipe, seed=4).fit().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_time_budget_stops_early(pipe):
    trainer = small_trainer(pipe, steps=100_000, time_budget=2.0)  # seconds for the whole fit
    adapter = trainer.fit()
    assert len(trainer.history) < 100_000 and adapter.fit["fine_tuning"]["steps_run"] == len(trainer.history)


def test_save_and_push_need_a_fit(pipe, tmp_path):
    trainer = small_trainer(pipe)
    with pytest.raises(ACEValueError, match="Call fit"):
        trainer.save(tmp_path / "a")
    trainer.fit()
    trainer.save(tmp_path / "a")
    assert ACEAdapter.from_pretrained(tmp_path / "a").method == "ace"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=-1), "steps must be an integer"),
        (dict(steps=2.5), "steps must be an integer"),
        (dict(learning_rate=0), "learning_rate must be a positive number"),
        (dict(batch_size=0), "batch_size must be an integer"),
        (dict(time_budget=-3), "time_budget must be a positive number"),
        (dict(adversarial_radius=0), "adversarial_radius must be a positive number"),
        (dict(search_phrases=-1), "search_phrases must be an integer"),
        (dict(adversarial_radius=float("inf")), "adversarial_radius must be a positive number"),
        (dict(synonyms=["ok", ""]), "synonyms must be a list"),
        (dict(synonyms=7), "synonyms must be a list of strings"),
        (dict(rank=0), "rank must be a positive integer"),
        (dict(rank=10_000), "exceeds the text width"),
        (dict(kind="nope"), "Unknown concept kind"),
    ],
)
def test_bad_arguments(pipe, kwargs, message):
    with pytest.raises(ACEValueError, match=message):
        small_trainer(pipe, **kwargs)


def test_one_synonym_is_one_word_not_its_letters(pipe):
    assert small_trainer(pipe, synonyms="Vincent").synonyms == ["Vincent"]


def test_default_steps_grow_with_the_number_of_concepts(pipe):
    assert ACETrainer(pipe, "Van Gogh", kind="style", progress=False).steps == default_steps(1) == 450
    four = ACETrainer(
        pipe, ["Van Gogh", "Claude Monet", "Rembrandt", "Frida Kahlo"], kind="style", progress=False
    )
    assert four.steps == default_steps(4) == 600
    assert default_steps(10_000) == MAX_DEFAULT_STEPS
    assert ACETrainer(pipe, ["Van Gogh", "Claude Monet"], kind="style", steps=7, progress=False).steps == 7


def test_a_diverging_fit_says_so(pipe):
    trainer = small_trainer(pipe, learning_rate=1e30)
    with pytest.raises(ACEValueError, match="Training diverged at step .*learning_rate=1e\\+30"):
        trainer.fit()
    assert trainer.adapter is None


def test_the_step_loop_reads_the_losses_back_in_batches_not_every_step(pipe, monkeypatch):
    reads = []
    original = ACETrainer.record_losses

    def counted(self, pending, bar, **kwargs):
        waiting = len(pending)
        assert all(isinstance(p, torch.Tensor) and p.shape == (3,) for p in pending)  # no float per step
        original(self, pending, bar, **kwargs)
        if waiting and not pending:  # read back and recorded in this call
            reads.append(waiting)

    monkeypatch.setattr(ACETrainer, "record_losses", counted)
    trainer = small_trainer(pipe, steps=LOSS_READ_EVERY * 2 + 3, adversarial=False, mined_synonyms=0)
    trainer.fit()
    assert [r for r in reads if r] == [LOSS_READ_EVERY, LOSS_READ_EVERY, 3]
    assert len(trainer.history) == LOSS_READ_EVERY * 2 + 3


def test_a_bfloat16_pipeline_trains_in_float32_and_keeps_its_dtype():
    """Half-precision pipelines (what GPUs run) fine-tune: the trainer's factors and losses are float32
    whatever the pipeline's dtype, and the loaded adapter runs in the pipeline's dtype."""
    from ace_diffusers.testing import tiny_sd_pipeline

    half = tiny_sd_pipeline().to(torch.bfloat16)
    trainer = small_trainer(half, steps=3, adversarial=False, mined_synonyms=0, queries_per_layer=8)
    adapter = trainer.fit()
    assert all(math.isfinite(loss) for loss in trainer.history) and len(trainer.history) == 3
    assert all(t.dtype == torch.float32 for f in adapter.layers.values() for t in f.tensors().values())
    half.load_ace_adapter(adapter)
    image = half("a painting by Van Gogh", num_inference_steps=2, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.dtype == torch.bfloat16 and bool(torch.isfinite(image).all())
    assert half.unet.dtype == torch.bfloat16


def test_the_record_says_whether_split_english_words_were_mined(pipe):
    """``dictionary`` (the default) mines English words the tokenizer splits, and the fit record says so."""
    with_words = small_trainer(pipe, steps=2, adversarial=False, dictionary=True).fit()
    assert with_words.fit["fine_tuning"]["dictionary"] is True
    assert small_trainer(pipe, steps=2, adversarial=False).fit().fit["fine_tuning"]["dictionary"] is False
