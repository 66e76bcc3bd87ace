import pytest
import torch

from ace_diffusers.errors import ACEValueError
from ace_diffusers.eval.judges import CallableJudge, CLIPZeroShotJudge, ShapesJudge
from ace_diffusers.shapes.classifier import HEADS


def _images(n=5, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("head", ["shape", "style", "colour"])
def test_shapes_judge_returns_labels_of_its_head(random_classifier, head):
    judge = ShapesJudge(random_classifier, head)
    labels = judge.predict(_images())
    assert len(labels) == 5 and set(labels) <= set(HEADS[head]) and judge.labels == HEADS[head]
    assert labels == random_classifier.predict(_images())[head]
    assert judge.predict(torch.zeros(0, 3, 32, 32)) == []


def test_shapes_judge_rejects_unknown_head_and_bad_images(random_classifier):
    with pytest.raises(ACEValueError):
        ShapesJudge(random_classifier, "size")
    with pytest.raises(ACEValueError):
        ShapesJudge(random_classifier).predict(torch.rand(3, 32, 32))


def test_clip_zero_shot_judge_mechanics(clip_model, clip_tok):
    labels = ["circle", "square", "shape"]
    judge = CLIPZeroShotJudge(clip_model, clip_tok, labels)
    images = _images(4)
    scores = judge.scores(images)
    assert scores.shape == (4, 3) and torch.all(scores.abs() <= 1 + 1e-5)  # cosine similarities
    predicted = judge.predict(images)
    assert len(predicted) == 4 and set(predicted) <= set(labels)
    assert predicted == [labels[i] for i in scores.argmax(-1).tolist()]
    assert judge.predict(images) == predicted  # deterministic; text features cached
    # any image size: resized on the short side and centre-cropped to the vision tower's size
    assert judge.preprocess(_images(2, size=48)).shape == (2, 3, 32, 32)
    assert len(judge.predict(torch.rand(2, 3, 40, 64))) == 2


def test_clip_zero_shot_judge_accepts_a_processor(clip_model, clip_tok):
    from transformers import CLIPImageProcessorPil, CLIPProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=clip_tok)
    judge = CLIPZeroShotJudge(clip_model, processor, ["a", "b"], templates=["{}"])
    assert judge.mean == (0.5, 0.5, 0.5)
    assert set(judge.predict(_images(3))) <= {"a", "b"}


def test_clip_zero_shot_judge_validates_labels(clip_model, clip_tok):
    with pytest.raises(ACEValueError):
        CLIPZeroShotJudge(clip_model, clip_tok, ["only one"])
    with pytest.raises(ACEValueError):
        CLIPZeroShotJudge(clip_model, clip_tok, ["a", "a"])
    with pytest.raises(ACEValueError):
        CLIPZeroShotJudge(clip_model, clip_tok, ["a", "b"], templates=["no placeholder"])


def test_callable_judge():
    judge = CallableJudge(lambda imgs: ["x"] * len(imgs), ["x", "y"])
    assert judge(_images(2)) == ["x", "x"]
    with pytest.raises(ACEValueError):
        CallableJudge(lambda imgs: ["x"], ["x"]).predict(_images(2))


def test_slot_judges_read_each_half_of_a_scene(random_classifier):
    from ace_diffusers.eval.judges import shapes_judges

    judges = shapes_judges(random_classifier)
    assert {"shape", "left_shape", "right_colour"} <= set(judges)
    scenes = torch.rand(4, 3, 32, 64, generator=torch.Generator().manual_seed(1))
    right = judges["right_shape"].predict(scenes)
    assert right == judges["left_shape"].predict(torch.cat([scenes[..., 32:], scenes[..., 32:]], -1))
    assert judges["right_shape"].labels == HEADS["shape"] and "none" in HEADS["shape"]
