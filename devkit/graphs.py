"""API-format graphs used by tests, benchmarks and the demo (built in code, so node inputs stay in one place)."""
from __future__ import annotations

from ..guidance.combine import CONTROL_WEIGHT_START, DOMAIN_WEIGHT_START


def t2i_core(ckpt: str, prompt: str = "a red circle", negative: str = "", seed: int = 0, steps: int = 4,
             cfg: float = 7.0, size: int = 64, prefix: str = "indomain_core", controlnet: str | None = None) -> dict:
    """CheckpointLoaderSimple -> CLIPTextEncode x2 -> (ControlNet) -> KSampler -> VAEDecode -> SaveImage."""
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }
    if controlnet:
        g["8"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": controlnet}}
        g["9"] = {"class_type": "EmptyImage", "inputs": {"width": size, "height": size, "batch_size": 1, "color": 16777215}}
        g["10"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "control_net": ["8", 0], "image": ["9", 0],
            "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
        g["5"]["inputs"]["positive"] = ["10", 0]
        g["5"]["inputs"]["negative"] = ["10", 1]
    return g


def decoupled_forms(ckpt: str, domain: str, prompt: str = "a red circle", seed: int = 0, steps: int = 4,
                    cfg: float = CONTROL_WEIGHT_START, domain_weight: float = DOMAIN_WEIGHT_START, batch: int = 1, size: int = 64,
                    sampler: str = "euler", scheduler: str = "normal", controlnet: str | None = None,
                    domain_on_controlnet: bool = False, forms=("core_ksampler", "ksampler", "guider", "patch", "core_guider"),
                    domain_start: float = 0.0, domain_end: float = 1.0, domain_cache: str | None = None,
                    domain_cache_threshold: float | None = None) -> tuple[dict, dict]:
    """One API graph holding the decoupled sampler in its three node forms (and core references), sharing
    loaders and conditioning. Returns (graph, {form: node_id of its LATENT output})."""
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": batch}},
        "20": {"class_type": "InDomainLoadDomainUNet", "inputs": {"model": ["1", 0], "domain_unet_name": domain}},
    }
    pos, neg = ["2", 0], ["3", 0]
    if controlnet:
        g["8"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": controlnet}}
        g["9"] = {"class_type": "EmptyImage", "inputs": {"width": size, "height": size, "batch_size": 1, "color": 16777215}}
        g["10"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": pos, "negative": neg, "control_net": ["8", 0], "image": ["9", 0],
            "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
        pos, neg = ["10", 0], ["10", 1]
    domain_tail = {"domain_on_controlnet": domain_on_controlnet, "domain_start_percent": domain_start,
                   "domain_end_percent": domain_end}
    if domain_cache is not None:  # unset: the node's default (off)
        domain_tail["domain_cache"] = domain_cache
    if domain_cache_threshold is not None:
        domain_tail["domain_cache_threshold"] = domain_cache_threshold
    ks = {"seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
          "positive": pos, "negative": neg, "latent_image": ["4", 0], "denoise": 1.0}
    out = {}
    if "core_ksampler" in forms:
        g["5"] = {"class_type": "KSampler", "inputs": {"model": ["1", 0], **ks}}
        out["core_ksampler"] = "5"
    if "ksampler" in forms:
        g["30"] = {"class_type": "InDomainKSampler", "inputs": {"model": ["1", 0], "domain_model": ["20", 0],
                                                               "domain_weight": domain_weight, **ks, **domain_tail}}
        out["ksampler"] = "30"
    if "guider" in forms or "core_guider" in forms:
        g["32"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}}
        g["33"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": sampler}}
        g["34"] = {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": scheduler, "steps": steps,
                                                               "denoise": 1.0}}
    if "guider" in forms:
        g["31"] = {"class_type": "InDomainGuider", "inputs": {"model": ["1", 0], "domain_model": ["20", 0],
                                                             "positive": pos, "negative": neg, "cfg": cfg,
                                                             "domain_weight": domain_weight, **domain_tail}}
        g["35"] = {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["32", 0], "guider": ["31", 0],
                                                                    "sampler": ["33", 0], "sigmas": ["34", 0],
                                                                    "latent_image": ["4", 0]}}
        out["guider"] = "35"
    if "core_guider" in forms:
        g["40"] = {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": pos, "negative": neg, "cfg": cfg}}
        g["41"] = {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["32", 0], "guider": ["40", 0],
                                                                    "sampler": ["33", 0], "sigmas": ["34", 0],
                                                                    "latent_image": ["4", 0]}}
        out["core_guider"] = "41"
    if "patch" in forms:
        g["36"] = {"class_type": "InDomainApplyGuidance", "inputs": {"model": ["1", 0], "domain_model": ["20", 0],
                                                                    "domain_weight": domain_weight, **domain_tail}}
        g["37"] = {"class_type": "KSampler", "inputs": {"model": ["36", 0], **ks}}
        out["patch"] = "37"
    return g, out


def sample_with_domain(ckpt: str, domain_node: dict, prompt: str = "a red circle", seed: int = 0, steps: int = 2,
                       size: int = 64) -> dict:
    """Checkpoint -> prompts -> Domain KSampler, with the domain MODEL from `domain_node` (node "2": a
    Load Domain UNet or a Train Domain UNet node wired to the checkpoint "1"). The LATENT is node "6"."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": domain_node,
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["1", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": {"class_type": "InDomainKSampler", "inputs": {
            "model": ["1", 0], "domain_model": ["2", 0], "seed": seed, "steps": steps, "cfg": CONTROL_WEIGHT_START,
            "domain_weight": DOMAIN_WEIGHT_START,
            "sampler_name": "euler", "scheduler": "normal", "positive": ["3", 0], "negative": ["4", 0],
            "latent_image": ["5", 0], "denoise": 1.0, "domain_on_controlnet": False,
            "domain_start_percent": 0.0, "domain_end_percent": 1.0}},
    }
