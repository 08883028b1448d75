"""Zero-shot classification: OpenAI's templates, class weights as in OpenAI's notebook."""

import pytest
import torch

import fastclip
from fastclip.images import decode_image
from fastclip.zero_shot import IMAGENET_TEMPLATES, classify, zero_shot_classifier

from embed_helpers import image_bytes, tiny_checkpoint
from numerics import assert_close_relative


@pytest.fixture(scope="module")
def model():
    return fastclip.load(tiny_checkpoint(), device="cpu")


def test_imagenet_templates_are_openais_eighty():
    assert len(IMAGENET_TEMPLATES) == 80 and len(set(IMAGENET_TEMPLATES)) == 80
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
    assert IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
    metadata = pytest.importorskip("open_clip.zero_shot_metadata")
    assert list(IMAGENET_TEMPLATES) == [t("{}") for t in metadata.OPENAI_IMAGENET_TEMPLATES]


def notebook_classifier(model, classnames, templates):
    """OpenAI's notebook, class by class."""
    weights = []
    with torch.no_grad():
        for name in classnames:
            tokens = fastclip.tokenize([t.format(name) for t in templates])
            embeddings = model.encode_text(tokens).float()
            embeddings /= embeddings.norm(dim=-1, keepdim=True)
            embedding = embeddings.mean(dim=0)
            weights.append(embedding / embedding.norm())
    return torch.stack(weights, dim=1)


def test_classifier_equals_openais_notebook(model):
    clip_model, _ = model
    classnames = ["cat", "dog", "traffic light"]
    templates = IMAGENET_TEMPLATES[:9]
    # batch_size 4 cuts the 27 prompts across classes, so batching is exercised.
    weights = zero_shot_classifier(clip_model, classnames, templates, batch_size=4)
    expected = notebook_classifier(clip_model, classnames, templates)
    assert weights.shape == (clip_model.text_projection.shape[1], 3)
    assert_close_relative(weights, expected, 1e-5, "zero-shot weights")


def test_classify_gives_probabilities_of_the_scaled_cosines(model):
    clip_model, preprocess = model
    weights = zero_shot_classifier(clip_model, ["a", "b"], ["{}"])
    images = torch.stack([preprocess(decode_image(image_bytes(i))) for i in range(3)])
    probabilities = classify(clip_model, images, weights)
    with torch.no_grad():
        features = clip_model.encode_image(images).float()
        features /= features.norm(dim=-1, keepdim=True)
        expected = (clip_model.logit_scale.exp() * features @ weights).softmax(dim=-1)
    assert_close_relative(probabilities, expected, 1e-5, "probabilities")


def test_bad_arguments_say_what_to_give(model):
    with pytest.raises(ValueError, match="at least one class name"):
        zero_shot_classifier(model[0], [], IMAGENET_TEMPLATES)
    with pytest.raises(ValueError, match="must contain '{}'"):
        zero_shot_classifier(model[0], ["cat"], ["a photo"])
