"""CONDITIONING helpers: find and strip the ControlNet of a conditioning, and the domain pass's conditioning.

Raw CONDITIONING is a list of [tensor, dict]; inside a sampling run ComfyUI works on processed
conds (the dicts alone). These helpers read and build both.
"""
from __future__ import annotations

CONTROL_KEYS = ("control", "control_apply_to_uncond")


def first_control(conditioning):
    """The ControlNet attached to a CONDITIONING (raw or processed), or None."""
    for c in conditioning or []:
        d = c[1] if isinstance(c, (list, tuple)) else c
        if d.get("control") is not None:
            return d["control"]
    return None


def with_control(entry: dict, control=None) -> dict:
    """A copy of one conditioning dict with its ControlNet removed, then `control` attached (if any)."""
    out = {k: v for k, v in entry.items() if k not in CONTROL_KEYS}
    if control is not None:
        out["control"] = control
    return out


def domain_conditioning(negative, positive=None, domain_on_control: bool = False):
    """The domain pass's CONDITIONING: the negative (∅) entries, whose text the null-text UNet
    ignores but whose extra inputs (SDXL's pooled/size vector `y`) it needs; ControlNet removed,
    or taken from the positive when `domain_on_control`. Works on raw and processed conds."""
    control = first_control(positive) if domain_on_control else None
    return [[c[0], with_control(c[1], control)] if isinstance(c, (list, tuple)) else with_control(c, control)
            for c in negative]


def fill_text_free(conditioning, base_patcher):
    """CONDITIONING whose text-free entries ([None, {...}], what core's DualModelGuider uses for an unconnected
    negative) carry a zeroed text embedding of the size the base takes, as core's ConditioningZeroOut gives.
    The base needs some text input for its unconditional; a null-text domain UNet ignores it. Entries with
    text are kept as they are."""
    if not any(isinstance(c, (list, tuple)) and c[0] is None for c in conditioning or []):
        return conditioning
    import torch

    model_config = base_patcher.model.model_config
    context_dim = model_config.unet_config.get("context_dim")
    if not context_dim:
        raise ValueError("A text-free CONDITIONING ([None, {}]) reached a guider whose base MODEL takes no text "
                         "embedding; connect the conditioning this model expects.")
    out = []
    for c in conditioning:
        if not (isinstance(c, (list, tuple)) and c[0] is None):
            out.append(c)
            continue
        d = dict(c[1])
        if model_config.unet_config.get("adm_in_channels") and type(model_config).__name__.startswith("SDXL"):
            d.setdefault("pooled_output", torch.zeros(1, 1280))  # SDXL builds its y vector from it
        out.append([torch.zeros(1, 77, context_dim), d])
    return out


def with_trained_y(conds, y):
    """Processed conds whose `y` (SDXL's pooled + size vector, built from the negative at the sampling size) is
    replaced by the vector the domain model was trained with (guidance.checkpoint.trained_y). `y` None (files
    written before it was stored, models without a y input): the conds as they are."""
    if y is None:
        return conds
    import comfy.conds

    out = []
    for c in conds:
        mc = c.get("model_conds") if isinstance(c, dict) else None
        if not mc or "y" not in mc:
            out.append(c)
            continue
        out.append(dict(c, model_conds=dict(mc, y=comfy.conds.CONDRegular(y))))
    return out


# Conditioning keys that are not text: what the negative gives the domain pass of a text-free-by-empty-prompt
# model (reference latents of Qwen-Image-Edit / Kontext / Flux.2, Wan I2V's concat latent and mask and its
# clip-vision output, the distilled guidance value, areas, masks, timestep ranges, hooks). Every other key of
# the empty prompt's entry is taken as text (pooled_output, attention_mask, and whatever a text encoder adds).
NON_TEXT_KEYS = frozenset({
    "reference_latents", "reference_latents_method", "concat_latent_image", "concat_mask", "concat_image",
    "clip_vision_output", "unclip_conditioning", "noise_augmentation", "guidance", "control",
    "control_apply_to_uncond", "gligen", "area", "strength", "mask", "mask_strength", "set_area_to_bounds",
    "start_percent", "end_percent", "timestep_start", "timestep_end", "hooks", "model_conds",
    "time_dim_concat", "vace_frames", "vace_mask", "vace_strength", "camera_conditions",
})
# text keys a text encoder may add; dropped from the negative's entry when the empty prompt lacks them
TEXT_KEYS = frozenset({"cross_attn", "pooled_output", "attention_mask", "attention_mask_img_shape",
                       "conditioning_lyrics", "lyrics_strength", "unprojected"})


def _text_free_entry(neg, empty):
    """One negative entry with its text replaced by the empty prompt's (raw [tensor, dict] or converted dict)."""
    raw = isinstance(neg, (list, tuple))
    neg_d = dict(neg[1] if raw else neg)
    empty_d = empty[1] if isinstance(empty, (list, tuple)) else empty
    out = {k: v for k, v in neg_d.items() if k not in TEXT_KEYS}
    out.update({k: v for k, v in empty_d.items() if k not in NON_TEXT_KEYS})
    out.pop("uuid", None)
    if raw:
        return [empty[0] if isinstance(empty, (list, tuple)) else empty_d.get("cross_attn"), out]
    import uuid

    if isinstance(empty, (list, tuple)):
        out["cross_attn"] = empty[0]
    out["uuid"] = uuid.uuid4()  # a cond of its own (core keys per-cond caches such as EasyCache by it)
    return out


def text_free_conditioning(negative, empty_prompt):
    """The domain pass's conditioning for a model that is text-free by the encoded empty prompt (DiT LoRAs).

    Text from `empty_prompt` (its first entry: the context tensor and every key that is not in NON_TEXT_KEYS,
    e.g. pooled_output, attention_mask); everything else from each `negative` entry (reference latents, I2V
    concat latent and clip-vision, the guidance value of a distilled model, areas, masks, hooks). So u (the
    negative) and D see the same image conditioning and differ only in the text (and the model). Works on raw
    CONDITIONING and on converted conds (dicts with `cross_attn`). ControlNet is handled by domain_conditioning."""
    if not empty_prompt:
        raise ValueError("the empty-prompt conditioning is empty")
    empty = empty_prompt[0]
    return [_text_free_entry(c, empty) for c in negative]


EMPTY_PROMPT_REFUSAL = (
    "{node}: the domain model is text-free by the EMPTY PROMPT (a LoRA for a DiT family such as SD3, Flux, "
    "Chroma, Flux.2, Lumina 2 / Z-Image, Qwen-Image or Wan), so its pass needs the encoded empty prompt: these "
    "models fail without a text context, and your negative may be another text (Wan's stock negative is a long "
    "prompt; u stays the negative, D must be text-free). Connect a CLIP Text Encode with an EMPTY text (the text "
    "encoder of this base) to 'empty_prompt' (if your negative is the empty prompt, connect the same node to both).")
