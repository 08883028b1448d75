"""OpenAI's CLIP, bottom-up: Bottleneck, AttentionPool2d, ModifiedResNet, LayerNorm,
QuickGELU, ResidualAttentionBlock, Transformer, VisionTransformer, CLIP.

Parameter names are the keys of OpenAI's checkpoints, so they load with ``strict=True``.
Token sequences are batch-first, ``(N, L, D)``. Blocks compute through ``self.ops`` (a
``fastclip.ops.Backend``), which ``CLIP.set_backend`` chooses for the whole model.
"""

import math
from collections import OrderedDict

import torch
from torch import nn

from .ops import reference
from .ops.dispatch import REFERENCE, ComputesWithBackend, get_backend


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        # All convolutions have stride 1; an average pool follows the second when stride > 1.
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion)),
            ]))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module, ComputesWithBackend):
    def __init__(self, spacial_dim, embed_dim, num_heads, output_dim=None):
        super().__init__()
        self.positional_embedding = nn.Parameter(
            torch.randn(spacial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim or embed_dim)
        self.num_heads = num_heads

    def forward(self, x):
        return self.ops.attention_pool2d(
            x, self.positional_embedding,
            self.q_proj.weight, self.q_proj.bias, self.k_proj.weight, self.k_proj.bias,
            self.v_proj.weight, self.v_proj.bias, self.c_proj.weight, self.c_proj.bias,
            self.num_heads)


class ModifiedResNet(nn.Module):
    """OpenAI's ResNet: a three-convolution stem with an average pool instead of a max pool,
    anti-aliased strided blocks (an average pool before each strided convolution), and
    attention pooling instead of global average pooling."""

    def __init__(self, layers, output_dim, heads, input_resolution=224, width=64):
        super().__init__()
        self.output_dim = output_dim
        self.input_resolution = input_resolution
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)

        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)

        embed_dim = width * 32  # the ResNet feature dimension
        self.attnpool = AttentionPool2d(input_resolution // 32, embed_dim, heads, output_dim)

    def _make_layer(self, planes, blocks, stride=1):
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def stem(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def forward(self, x):
        # channels_last: oneDNN's convolutions prefer it, and every layer here keeps the
        # layout. The math is unchanged.
        x = x.to(self.conv1.weight.dtype, memory_format=torch.channels_last)
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)


class LayerNorm(nn.LayerNorm, ComputesWithBackend):
    """LayerNorm computed in fp32 whatever the input's dtype, then cast back."""

    def forward(self, x):
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps)

    def add_and_norm(self, x, residual):
        """``(x + residual, self(x + residual))``, computed in one pass where a backend fuses it."""
        return self.ops.add_layer_norm(x, residual, self.weight, self.bias, self.eps)


class QuickGELU(nn.Module):
    def forward(self, x):
        return reference.quick_gelu(x)


class MultiheadAttention(nn.Module, ComputesWithBackend):
    """Self-attention with the parameter layout of ``nn.MultiheadAttention`` (a packed
    ``in_proj`` and an ``out_proj``), so OpenAI's keys load; batch-first."""

    def __init__(self, d_model, n_head):
        super().__init__()
        self.n_head = n_head
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x, causal=False):
        qkv = self.ops.linear(x, self.in_proj_weight, self.in_proj_bias)
        return self.ops.linear(self.ops.attention(qkv, self.n_head, causal),
                               self.out_proj.weight, self.out_proj.bias)


class MLP(nn.Module, ComputesWithBackend):
    """c_fc -> activation -> c_proj, named as in OpenAI's checkpoints. The activation is
    QuickGELU (OpenAI's models) or GELU (LAION's), applied by the backend's fused op; it has
    no parameters, so the state dict is the same either way."""

    def __init__(self, d_model, quick_gelu=True):
        super().__init__()
        self.c_fc = nn.Linear(d_model, d_model * 4)
        self.c_proj = nn.Linear(d_model * 4, d_model)
        self.activation = "quick_gelu" if quick_gelu else "gelu"

    def forward(self, x, residual=None):
        """``c_proj(activation(c_fc(x)))``, plus ``residual`` when given (added in the
        product's epilogue where the backend can)."""
        return self.ops.mlp(x, self.c_fc.weight, self.c_fc.bias,
                            self.c_proj.weight, self.c_proj.bias, self.activation, residual)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d_model, n_head, causal=False, quick_gelu=True):
        super().__init__()
        self.attn = MultiheadAttention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = MLP(d_model, quick_gelu)
        self.ln_2 = LayerNorm(d_model)
        self.causal = causal

    def forward(self, x):
        x, normed = self.ln_2.add_and_norm(x, self.attn(self.ln_1(x), self.causal))
        return self.mlp(normed, residual=x)


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, causal=False, quick_gelu=True):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.Sequential(
            *[ResidualAttentionBlock(width, heads, causal, quick_gelu) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


def _plain_conv(module):
    """Whether calling ``module`` is only its convolution: an ``nn.Conv2d`` with no hooks of
    its own or global ones."""
    from torch.nn.modules import module as hooks
    return (type(module) is nn.Conv2d and module.bias is None and not module._forward_hooks
            and not module._forward_pre_hooks and not hooks._global_forward_hooks
            and not hooks._global_forward_pre_hooks and module.padding_mode == "zeros"
            and module.stride == module.kernel_size and module.padding in ((0, 0), "valid")
            and module.dilation == (1, 1) and module.groups == 1)


class VisionTransformer(nn.Module, ComputesWithBackend):
    def __init__(self, input_resolution, patch_size, width, layers, heads, output_dim,
                 quick_gelu=True):
        super().__init__()
        self.input_resolution = input_resolution
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(
            scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, quick_gelu=quick_gelu)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x):
        x = x.type(self.conv1.weight.dtype)
        if _plain_conv(self.conv1):  # conv1, as (N, grid*grid, width) tokens
            x = self.ops.patch_embed(x, self.conv1.weight)
        else:  # hooked or replaced (pruning, adapters): the module itself
            x = self.conv1(x).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        x = self.ln_post(x[:, 0])
        return x @ self.proj.to(x.dtype)


def unit_norm(features):
    """``features`` divided by their L2 norm along the last dimension: computed in fp32 and
    returned in ``features``' dtype, so that low-precision rows are as near unit norm as their
    dtype allows."""
    full = features.float()
    return (full / full.norm(dim=-1, keepdim=True)).to(features.dtype)


class CLIP(nn.Module):
    def __init__(self, embed_dim,
                 # vision
                 image_resolution, vision_layers, vision_width, vision_patch_size,
                 # text
                 context_length, vocab_size, transformer_width, transformer_heads,
                 transformer_layers, quick_gelu=True, vision_heads=None):
        super().__init__()
        self.context_length = context_length
        # OpenAI's models have 64-wide heads; vision_heads overrides that (e.g. LAION's
        # ViT-H/14 has 16 heads of width 80).
        if isinstance(vision_layers, (tuple, list)):
            self.visual = ModifiedResNet(
                layers=vision_layers, output_dim=embed_dim,
                heads=vision_heads or vision_width * 32 // 64,
                input_resolution=image_resolution, width=vision_width)
        else:
            self.visual = VisionTransformer(
                input_resolution=image_resolution, patch_size=vision_patch_size,
                width=vision_width, layers=vision_layers, heads=vision_heads or vision_width // 64,
                output_dim=embed_dim, quick_gelu=quick_gelu)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads,
                                       causal=True, quick_gelu=quick_gelu)
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        self.initialize_parameters()
        self.backend = REFERENCE.name

    def initialize_parameters(self):
        """OpenAI's initialization."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if isinstance(self.visual, ModifiedResNet):
            pool = self.visual.attnpool
            std = pool.c_proj.in_features ** -0.5
            for proj in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.normal_(proj.weight, std=std)
            for stage in (self.visual.layer1, self.visual.layer2, self.visual.layer3,
                          self.visual.layer4):
                for name, param in stage.named_parameters():
                    if name.endswith("bn3.weight"):
                        nn.init.zeros_(param)
        width, layers = self.transformer.width, self.transformer.layers
        proj_std = width ** -0.5 * (2 * layers) ** -0.5
        attn_std = width ** -0.5
        fc_std = (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    def set_backend(self, backend="auto"):
        """Choose the implementation of every fused operation, for the whole model.

        ``backend`` is a name (see ``fastclip.backends``) or a ``Backend``; ``"auto"`` is
        resolved for the device the model's weights are on. Returns the model.
        """
        backend = get_backend(backend, self.logit_scale.device)
        for module in self.modules():
            if isinstance(module, ComputesWithBackend):
                module.ops = backend
        self.backend = backend.name
        return self

    @property
    def dtype(self):
        return self.visual.conv1.weight.dtype

    def encode_image(self, image, normalize=False):
        """The image embeddings of a preprocessed ``(N, 3, H, W)`` batch; unit-norm with
        ``normalize=True`` (computed in fp32, returned in the model's dtype)."""
        features = self.visual(image.type(self.dtype))
        return unit_norm(features) if normalize else features

    def encode_text(self, text, normalize=False):
        """The text embeddings of ``(N, L)`` token ids (``fastclip.tokenize``); unit-norm
        with ``normalize=True``."""
        if text.shape[-1] > self.context_length:
            raise ValueError(
                f"Text tokens have length {text.shape[-1]}, longer than this model's context "
                f"length {self.context_length}; tokenize with "
                f"context_length={self.context_length}.")
        x = self.token_embedding(text).type(self.dtype)
        x = x + self.positional_embedding[: text.shape[-1]].type(self.dtype)
        x = self.ln_final(self.transformer(x))
        # The features of the end-of-text token, which has the largest id in each sequence.
        x = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]
        features = x @ self.text_projection.type(self.dtype)
        return unit_norm(features) if normalize else features

    def forward(self, image, text):
        image_features = self.encode_image(image, normalize=True)
        text_features = self.encode_text(text, normalize=True)
        logit_scale = self.logit_scale.exp()
        logits_per_image = logit_scale * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


# The architectures of OpenAI's nine released models, as ``CLIP(**config)`` arguments.
CONFIGS = {
    "RN50": dict(embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3),
                 vision_width=64, vision_patch_size=None, transformer_width=512,
                 transformer_heads=8, transformer_layers=12),
    "RN101": dict(embed_dim=512, image_resolution=224, vision_layers=(3, 4, 23, 3),
                  vision_width=64, vision_patch_size=None, transformer_width=512,
                  transformer_heads=8, transformer_layers=12),
    "RN50x4": dict(embed_dim=640, image_resolution=288, vision_layers=(4, 6, 10, 6),
                   vision_width=80, vision_patch_size=None, transformer_width=640,
                   transformer_heads=10, transformer_layers=12),
    "RN50x16": dict(embed_dim=768, image_resolution=384, vision_layers=(6, 8, 18, 8),
                    vision_width=96, vision_patch_size=None, transformer_width=768,
                    transformer_heads=12, transformer_layers=12),
    "RN50x64": dict(embed_dim=1024, image_resolution=448, vision_layers=(3, 15, 36, 10),
                    vision_width=128, vision_patch_size=None, transformer_width=1024,
                    transformer_heads=16, transformer_layers=12),
    "ViT-B/32": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                     vision_patch_size=32, transformer_width=512, transformer_heads=8,
                     transformer_layers=12),
    "ViT-B/16": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                     vision_patch_size=16, transformer_width=512, transformer_heads=8,
                     transformer_layers=12),
    "ViT-L/14": dict(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024,
                     vision_patch_size=14, transformer_width=768, transformer_heads=12,
                     transformer_layers=12),
    "ViT-L/14@336px": dict(embed_dim=768, image_resolution=336, vision_layers=24,
                           vision_width=1024, vision_patch_size=14, transformer_width=768,
                           transformer_heads=12, transformer_layers=12),
}
for _config in CONFIGS.values():
    _config.update(context_length=77, vocab_size=49408)


def build_model_from_config(name, quick_gelu=True, **overrides):
    """A randomly initialized model of one of the nine architectures, e.g. ``"ViT-B/32"``.

    ``overrides`` replace entries of the configuration (for example a smaller
    ``transformer_layers``), so reduced versions of each architecture can be built.
    """
    if name not in CONFIGS:
        raise ValueError(f"Unknown architecture {name!r}; known: {', '.join(CONFIGS)}.")
    return CLIP(**{**CONFIGS[name], **overrides}, quick_gelu=quick_gelu)


def infer_config(state_dict):
    """The ``CLIP(...)`` arguments of a checkpoint, read off its parameter shapes as
    OpenAI's ``build_model`` does."""
    vit = "visual.proj" in state_dict
    if vit:
        vision_width = state_dict["visual.conv1.weight"].shape[0]
        vision_layers = len([k for k in state_dict
                             if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")])
        vision_patch_size = state_dict["visual.conv1.weight"].shape[-1]
        grid_size = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        image_resolution = vision_patch_size * grid_size
    else:
        vision_layers = tuple(
            len({k.split(".")[2] for k in state_dict if k.startswith(f"visual.layer{b}.")})
            for b in (1, 2, 3, 4))
        vision_width = state_dict["visual.layer1.0.conv1.weight"].shape[0]
        positions = state_dict["visual.attnpool.positional_embedding"].shape[0]
        output_width = round((positions - 1) ** 0.5)
        if output_width ** 2 + 1 != positions:
            raise ValueError("visual.attnpool.positional_embedding is not a square grid plus one")
        vision_patch_size = None
        image_resolution = output_width * 32
    transformer_width = state_dict["ln_final.weight"].shape[0]
    return dict(
        embed_dim=state_dict["text_projection"].shape[1],
        image_resolution=image_resolution,
        vision_layers=vision_layers,
        vision_width=vision_width,
        vision_patch_size=vision_patch_size,
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=state_dict["token_embedding.weight"].shape[0],
        transformer_width=transformer_width,
        transformer_heads=transformer_width // 64,
        transformer_layers=len({k.split(".")[2] for k in state_dict
                                if k.startswith("transformer.resblocks.")}),
    )


# Entries of OpenAI's TorchScript archives that are not parameters.
_NON_PARAMETER_KEYS = ("input_resolution", "context_length", "vocab_size")


def check_finite(state_dict):
    """Raise a ValueError naming the first floating-point tensor that holds NaN or infinite
    values: such weights give NaN embeddings for every input."""
    for name, tensor in state_dict.items():
        if tensor.is_floating_point():
            finite = torch.isfinite(tensor)
            if not bool(finite.all()):
                bad = tensor.numel() - int(finite.sum())
                raise ValueError(
                    f"The checkpoint's {name} holds {bad} NaN or infinite values (of "
                    f"{tensor.numel()}): its weights are corrupt or come from a diverged run; "
                    "use another checkpoint.")


def build_model(state_dict, quick_gelu=True, vision_heads=None, transformer_heads=None,
                dtype=None):
    """Build a CLIP whose architecture is inferred from ``state_dict`` and load it.

    ``dtype`` is the weights' dtype, in OpenAI's mixed layout for fp16 and bf16 (see
    ``convert_weights``); by default the checkpoint's own: unlike OpenAI's ``build_model``, an
    fp32 checkpoint gives an fp32 model, and an OpenAI fp16 checkpoint a model in OpenAI's
    mixed fp16 layout. The weights are converted once, as they are copied in.
    ``quick_gelu=False`` builds the nn.GELU variant used by LAION's checkpoints. Head
    counts cannot be read off a state dict: they are inferred with OpenAI's
    rule (64-wide heads) unless ``vision_heads`` or ``transformer_heads`` say otherwise.
    Returns the model in eval mode on the CPU.
    """
    state_dict = {k: v for k, v in state_dict.items() if k not in _NON_PARAMETER_KEYS}
    try:
        config = infer_config(state_dict)
        dtype = dtype or state_dict["visual.conv1.weight"].dtype
    except KeyError as missing:
        raise ValueError(
            f"This state dict is not a CLIP checkpoint: it has no {missing} entry.") from None
    check_finite(state_dict)
    if transformer_heads:
        config["transformer_heads"] = transformer_heads
    model = CLIP(**config, quick_gelu=quick_gelu, vision_heads=vision_heads)
    if dtype != torch.float32:
        convert_weights(model, dtype)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def convert_weights(model, dtype=torch.float16):
    """Convert the weights of convolutions, linear layers, attention projections and the
    output projections to ``dtype``, as OpenAI's ``convert_weights`` does for fp16.

    Norms (LayerNorm, BatchNorm), embeddings and ``logit_scale`` stay in fp32; LayerNorm
    always computes in fp32.
    """
    def convert(module):
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            module.weight.data = module.weight.data.to(dtype)
            if module.bias is not None:
                module.bias.data = module.bias.data.to(dtype)
        if isinstance(module, MultiheadAttention):
            module.in_proj_weight.data = module.in_proj_weight.data.to(dtype)
            module.in_proj_bias.data = module.in_proj_bias.data.to(dtype)
        for name in ("text_projection", "proj"):
            param = getattr(module, name, None)
            if isinstance(param, nn.Parameter):
                param.data = param.data.to(dtype)

    model.apply(convert)
    return model
