"""API-format graphs used by tests, benchmarks and the demo (built in code, so node inputs stay in one place)."""
from __future__ import annotations


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
