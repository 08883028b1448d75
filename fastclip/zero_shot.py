"""Zero-shot classification: class weights from prompt templates, as in OpenAI's ImageNet
notebook.

``zero_shot_classifier(model, classnames, templates)`` embeds every template filled with
every class name, normalizes, averages the templates of each class and normalizes again.
"""

import torch
import torch.nn.functional as F

from .tokenizer import tokenize

# OpenAI's 80 prompt templates for ImageNet (notebooks/Prompt_Engineering_for_ImageNet.ipynb).
IMAGENET_TEMPLATES = (
    'a bad photo of a {}.', 'a photo of many {}.', 'a sculpture of a {}.',
    'a photo of the hard to see {}.', 'a low resolution photo of the {}.',
    'a rendering of a {}.', 'graffiti of a {}.', 'a bad photo of the {}.',
    'a cropped photo of the {}.', 'a tattoo of a {}.', 'the embroidered {}.',
    'a photo of a hard to see {}.', 'a bright photo of a {}.', 'a photo of a clean {}.',
    'a photo of a dirty {}.', 'a dark photo of the {}.', 'a drawing of a {}.',
    'a photo of my {}.', 'the plastic {}.', 'a photo of the cool {}.',
    'a close-up photo of a {}.', 'a black and white photo of the {}.', 'a painting of the {}.',
    'a painting of a {}.', 'a pixelated photo of the {}.', 'a sculpture of the {}.',
    'a bright photo of the {}.', 'a cropped photo of a {}.', 'a plastic {}.',
    'a photo of the dirty {}.', 'a jpeg corrupted photo of a {}.', 'a blurry photo of the {}.',
    'a photo of the {}.', 'a good photo of the {}.', 'a rendering of the {}.',
    'a {} in a video game.', 'a photo of one {}.', 'a doodle of a {}.',
    'a close-up photo of the {}.', 'a photo of a {}.', 'the origami {}.',
    'the {} in a video game.', 'a sketch of a {}.', 'a doodle of the {}.', 'a origami {}.',
    'a low resolution photo of a {}.', 'the toy {}.', 'a rendition of the {}.',
    'a photo of the clean {}.', 'a photo of a large {}.', 'a rendition of a {}.',
    'a photo of a nice {}.', 'a photo of a weird {}.', 'a blurry photo of a {}.',
    'a cartoon {}.', 'art of a {}.', 'a sketch of the {}.', 'a embroidered {}.',
    'a pixelated photo of a {}.', 'itap of the {}.', 'a jpeg corrupted photo of the {}.',
    'a good photo of a {}.', 'a plushie {}.', 'a photo of the nice {}.',
    'a photo of the small {}.', 'a photo of the weird {}.', 'the cartoon {}.',
    'art of the {}.', 'a drawing of the {}.', 'a photo of the large {}.',
    'a black and white photo of a {}.', 'the plushie {}.', 'a dark photo of a {}.',
    'itap of a {}.', 'graffiti of the {}.', 'a toy {}.', 'itap of my {}.',
    'a photo of a cool {}.', 'a photo of a small {}.', 'a tattoo of the {}.',
)
SIMPLE_TEMPLATES = ("a photo of a {}.",)
TEMPLATE_SETS = {"imagenet": IMAGENET_TEMPLATES, "simple": SIMPLE_TEMPLATES}


def zero_shot_classifier(model, classnames, templates=IMAGENET_TEMPLATES, batch_size=256):
    """The ``(embed_dim, len(classnames))`` fp32 matrix whose columns are the classes'
    normalized mean prompt embeddings; ``image_features @ weights`` scores the classes."""
    classnames, templates = list(classnames), list(templates)
    if not classnames:
        raise ValueError("zero_shot_classifier needs at least one class name.")
    if not templates or any("{}" not in t for t in templates):
        raise ValueError("Each template must contain '{}' where the class name goes, e.g. "
                         "'a photo of a {}.'.")
    texts = [template.format(name) for name in classnames for template in templates]
    device = model.logit_scale.device
    with torch.inference_mode():
        features = torch.cat([
            model.encode_text(tokenize(texts[i:i + batch_size], model.context_length,
                                       truncate=True).to(device), normalize=True).float()
            for i in range(0, len(texts), batch_size)])
        # The mean of a class's unit prompt embeddings, made unit again (OpenAI's notebook).
        weights = F.normalize(features.view(len(classnames), len(templates), -1).mean(dim=1),
                              dim=-1)
    return weights.t().contiguous()


def classify(model, images, weights):
    """Class probabilities ``(len(images), n_classes)`` of preprocessed ``images`` (a
    ``(N, 3, H, W)`` tensor), with CLIP's learned temperature."""
    device = model.logit_scale.device
    with torch.inference_mode():
        features = model.encode_image(images.to(device), normalize=True).float()
        logits = model.logit_scale.exp().float() * features @ weights.to(device)
    return logits.softmax(dim=-1)
