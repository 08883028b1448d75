"""Zero-shot classification: class weights from prompt templates, as in OpenAI's ImageNet
notebook, and the ``fastclip classify`` command.

``zero_shot_classifier(model, classnames, templates)`` embeds every template filled with
every class name, normalizes, averages the templates of each class and normalizes again.
"""

import sys

import torch

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
                                       truncate=True).to(device)).float()
            for i in range(0, len(texts), batch_size)])
        features = features / features.norm(dim=-1, keepdim=True)
        weights = features.view(len(classnames), len(templates), -1).mean(dim=1)
        weights = weights / weights.norm(dim=-1, keepdim=True)
    return weights.t().contiguous()


def classify(model, images, weights):
    """Class probabilities ``(len(images), n_classes)`` of preprocessed ``images`` (a
    ``(N, 3, H, W)`` tensor), with CLIP's learned temperature."""
    device = model.logit_scale.device
    with torch.inference_mode():
        features = model.encode_image(images.to(device)).float()
        features = features / features.norm(dim=-1, keepdim=True)
        logits = model.logit_scale.exp().float() * features @ weights.to(device)
    return logits.softmax(dim=-1)


# ---------------------------------------------------------------------------------------
# fastclip classify

def add_arguments(parser):
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--labels", required=True,
                        help="comma-separated class names, e.g. 'a cat,a dog,a car'")
    parser.add_argument("--templates", choices=sorted(TEMPLATE_SETS), default="imagenet",
                        help="prompt templates: OpenAI's 80 ImageNet templates, or 'a photo "
                             "of a {}.' (default: imagenet)")
    parser.add_argument("-k", "--top-k", type=int, default=5, help="labels shown per image")
    parser.add_argument("--model", default="ViT-B/32",
                        help="a model name, a checkpoint path or 'random:tiny'")
    parser.add_argument("--device", default=None)
    parser.add_argument("--backend", default="auto")


def run(args):
    from .embed.decode import InputError, decode_image, read_file
    from .embed.models import load_model
    from .embed.pipeline import default_device

    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    if not labels:
        raise ValueError("--labels is empty; give comma-separated class names.")
    model, preprocess = load_model(args.model, args.device or default_device(), args.backend)
    weights = zero_shot_classifier(model, labels, TEMPLATE_SETS[args.templates])
    status = 0
    for path in args.images:
        try:
            image = preprocess(decode_image(read_file(path)))
        except InputError as error:
            print(f"{path}: skipped: {error}", file=sys.stderr)
            status = 1
            continue
        probabilities = classify(model, image[None], weights)[0]
        top = probabilities.topk(min(args.top_k, len(labels)))
        ranked = ", ".join(f"{labels[i]} {p:.3f}" for p, i in zip(top.values.tolist(),
                                                                   top.indices.tolist()))
        print(f"{path}\t{ranked}")
    return status
