"""The models fastclip is measured against, built on the same weights: open_clip's CLIP and
Hugging Face's ``transformers.CLIPModel``, each from one OpenAI-layout state dict.

Neither package is a dependency of fastclip: each builder imports its package when called
(``pytest.importorskip`` in the benchmarks), so a machine without one skips its comparisons.
"""

import torch

from fastclip.model import infer_config


def open_clip_model(state_dict, dtype=torch.float32):
    """open_clip's CLIP holding ``state_dict``, in eval mode.

    In fp16 or bf16, the weights are converted as OpenAI's ``convert_weights`` does (norms
    stay fp32: open_clip's ``LayerNormFp32`` needs fp32 weights).
    """
    import open_clip

    # The builder pops entries and rounds the weights to fp16: give it a copy, then load the
    # fp32 weights again into the fp32 model.
    model = open_clip.model.build_model_from_openai_state_dict(dict(state_dict), quick_gelu=True)
    model.float()
    model.load_state_dict(state_dict)
    if dtype != torch.float32:
        open_clip.model.convert_weights_to_lp(model, dtype)
    return model.eval()


def _hf_block(prefix, hf_prefix, state_dict):
    """One OpenAI ``ResidualAttentionBlock``'s weights under ``transformers``' names."""
    q, k, v = state_dict[f"{prefix}.attn.in_proj_weight"].chunk(3)
    q_bias, k_bias, v_bias = state_dict[f"{prefix}.attn.in_proj_bias"].chunk(3)
    renamed = {
        "self_attn.q_proj.weight": q, "self_attn.q_proj.bias": q_bias,
        "self_attn.k_proj.weight": k, "self_attn.k_proj.bias": k_bias,
        "self_attn.v_proj.weight": v, "self_attn.v_proj.bias": v_bias,
    }
    for openai, hf in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                       ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                       ("mlp.c_proj", "mlp.fc2")):
        for kind in ("weight", "bias"):
            renamed[f"{hf}.{kind}"] = state_dict[f"{prefix}.{openai}.{kind}"]
    return {f"{hf_prefix}.{name}": tensor for name, tensor in renamed.items()}


def hf_state_dict(state_dict):
    """An OpenAI ViT CLIP state dict converted to ``transformers.CLIPModel``'s names.

    The transposes: OpenAI's projections are ``x @ proj`` matrices, transformers' are
    ``nn.Linear`` weights.
    """
    config = infer_config(state_dict)
    converted = {
        "logit_scale": state_dict["logit_scale"],
        "text_projection.weight": state_dict["text_projection"].t(),
        "visual_projection.weight": state_dict["visual.proj"].t(),
        "text_model.embeddings.token_embedding.weight": state_dict["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state_dict["positional_embedding"],
        "text_model.final_layer_norm.weight": state_dict["ln_final.weight"],
        "text_model.final_layer_norm.bias": state_dict["ln_final.bias"],
        "vision_model.embeddings.class_embedding": state_dict["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state_dict["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight":
            state_dict["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state_dict["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state_dict["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state_dict["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state_dict["visual.ln_post.bias"],
    }
    for i in range(config["transformer_layers"]):
        converted.update(_hf_block(f"transformer.resblocks.{i}",
                                   f"text_model.encoder.layers.{i}", state_dict))
    for i in range(config["vision_layers"]):
        converted.update(_hf_block(f"visual.transformer.resblocks.{i}",
                                   f"vision_model.encoder.layers.{i}", state_dict))
    return {name: tensor.contiguous() for name, tensor in converted.items()}


def hf_config(state_dict):
    """The ``transformers.CLIPConfig`` of an OpenAI ViT CLIP state dict."""
    from transformers import CLIPConfig

    config = infer_config(state_dict)
    text_width, vision_width = config["transformer_width"], config["vision_width"]
    return CLIPConfig(
        projection_dim=config["embed_dim"],
        text_config=dict(
            vocab_size=config["vocab_size"], hidden_size=text_width,
            intermediate_size=4 * text_width, num_hidden_layers=config["transformer_layers"],
            num_attention_heads=config["transformer_heads"],
            max_position_embeddings=config["context_length"], hidden_act="quick_gelu",
            projection_dim=config["embed_dim"],
            # The text's features are those of its first end-of-text token, OpenAI's choice.
            eos_token_id=49407),
        vision_config=dict(
            hidden_size=vision_width, intermediate_size=4 * vision_width,
            num_hidden_layers=config["vision_layers"], num_attention_heads=vision_width // 64,
            image_size=config["image_resolution"], patch_size=config["vision_patch_size"],
            hidden_act="quick_gelu", projection_dim=config["embed_dim"]),
    )


def hf_model(state_dict):
    """``transformers.CLIPModel`` holding an OpenAI ViT CLIP ``state_dict``, in eval mode.

    transformers has no ResNet CLIP, so ``state_dict`` must be a ViT's.
    """
    from transformers import CLIPModel

    if "visual.proj" not in state_dict:
        raise ValueError("transformers.CLIPModel has no ResNet image tower; pass a ViT's weights.")
    model = CLIPModel(hf_config(state_dict))
    missing, unexpected = model.load_state_dict(hf_state_dict(state_dict), strict=False)
    missing = [name for name in missing if not name.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"transformers.CLIPModel did not take the converted weights: "
                           f"missing {missing}, unexpected {unexpected}")
    return model.eval()


def hf_encode_image(model, images):
    return _features(model.get_image_features(pixel_values=images))


def hf_encode_text(model, tokens):
    return _features(model.get_text_features(input_ids=tokens))


def _features(output):
    """The projected features: a tensor in transformers 4, an output's ``pooler_output`` in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output
