"""The specs of the shared workflows: one spec each, emitted as UI format (example_workflows/<name>.json,
the templates ComfyUI offers for the pack; drag and drop) and API format (workflows/api/<name>.json, for
POST /prompt and the headless client).

Regenerate after a node schema change (starts a real ComfyUI server to read /object_info):

    .venv/bin/python -m indomain.devkit.workflows            # writes example_workflows/ and workflows/api/
    .venv/bin/python -m indomain.devkit.workflows --check    # fails if the files are stale

ComfyUI lists <pack>/example_workflows/*.json (and a few other folder names, not recursively) as templates, with
<same name>.jpg as the thumbnail; the browser test makes the thumbnails from the real frontend's screenshot
(INDOMAIN_UPDATE_SCREENSHOTS=1). The API twins live in workflows/api/, which no template listing reads.

To add a workflow: write a function returning a Workflow (the helpers below lay out the usual blocks), append
it to SPECS. A spec whose node types the server does not have is skipped with a message.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..guidance.combine import CONTROL_WEIGHT_START, DOMAIN_WEIGHT_START
from .host import PACK_ROOT
from .node_schema import is_widget, ordered_inputs
from .workflow_builder import FRONTEND_ONLY, Workflow

TEMPLATES_DIR = PACK_ROOT / "example_workflows"
API_DIR = PACK_ROOT / "workflows" / "api"
THUMBNAIL_SIZE = (768, 432)  # the template browser's cards are about 16:9

# Placeholders a user replaces with their own files (tests override them with the tiny models).
BASE_CKPT = "v1-5-pruned-emaonly.safetensors"
FINETUNED_CKPT = "my_finetuned_sd15.safetensors"
DOMAIN_UNET = "my_domain.safetensors"
CONTROLNET = "control_v11p_sd15_canny.safetensors"
HINT_IMAGE = "control_hint.png"
INPUT_IMAGE = "input_image.png"
TRAIN_FOLDER = "domain_images"  # a subfolder of ComfyUI/input (the node reads only those)

# The paper's starting point: 25 steps of a multistep solver, control weight 2.5, domain weight 2.0.
STEPS, SAMPLER, SCHEDULER = 25, "dpmpp_2m", "karras"
CFG, DOMAIN_WEIGHT, SEED = CONTROL_WEIGHT_START, DOMAIN_WEIGHT_START, 42
SIZE = 512

# Widget values of the training node after the links and image_folder; filled from its real schema
# (see _train_widgets) so the file follows the node.
TRAIN_WIDGETS: dict = {}

BLUE, ORANGE, GREEN, PURPLE, RED = "#3f789e", "#b58b2a", "#8A8", "#a1309b", "#b06634"

COL_MODELS, COL_PROMPTS, COL_CONTROL, COL_SAMPLE, COL_OUT = 0, 400, 880, 1300, 1720


def _models(wf: Workflow, y: int = 0):
    ckpt = wf.add("CheckpointLoaderSimple", (COL_MODELS, y), title="Base checkpoint (frozen, SD1.5)",
                  size=(315, 98), ckpt_name=BASE_CKPT)
    domain = wf.add("InDomainLoadDomainUNet", (COL_MODELS, y + 170), title="Load Domain UNet (your trained domain)",
                    size=(315, 82), model=ckpt[0], domain_unet_name=DOMAIN_UNET)
    wf.group("1. Models", [ckpt, domain], BLUE)
    return ckpt, domain


def _prompts(wf: Workflow, ckpt, positive: str, negative: str = "", pos_title: str = "Positive prompt (text control)",
             batch_size: int | None = None):
    """The two prompts, and the empty latent (image size) when batch_size is given."""
    pos = wf.add("CLIPTextEncode", (COL_PROMPTS, 0), title=pos_title, size=(400, 160), text=positive, clip=ckpt[1])
    neg = wf.add("CLIPTextEncode", (COL_PROMPTS, 230), title="Negative prompt (empty = unconditional)",
                 size=(400, 160), text=negative, clip=ckpt[1])
    members, latent = [pos, neg], None
    if batch_size is not None:
        latent = wf.add("EmptyLatentImage", (COL_PROMPTS, 460), size=(315, 106), width=SIZE, height=SIZE,
                        batch_size=batch_size)
        members.append(latent)
    wf.group("2. Prompts and image size" if latent else "2. Prompts", members, ORANGE)
    return pos, neg, latent


def _output(wf: Workflow, latent, ckpt, prefix: str, x: int = COL_OUT):
    decode = wf.add("VAEDecode", (x, 0), size=(210, 46), samples=latent, vae=ckpt[2])
    save = wf.add("SaveImage", (x, 100), size=(400, 420), images=decode[0], filename_prefix=prefix)
    wf.group("Output", [decode, save], PURPLE)
    return decode, save


def _domain_ksampler(wf: Workflow, pos, x, y, title, model, domain, positive, negative, latent, cfg=CFG,
                     denoise=1.0, domain_on_controlnet=False):
    return wf.add("InDomainKSampler", (x, y), title=title, size=(340, 474),
                  model=model, domain_model=domain, seed=SEED, steps=STEPS, cfg=cfg, domain_weight=DOMAIN_WEIGHT,
                  sampler_name=SAMPLER, scheduler=SCHEDULER, positive=positive, negative=negative,
                  latent_image=latent, denoise=denoise, domain_on_controlnet=domain_on_controlnet,
                  domain_start_percent=0.0, domain_end_percent=1.0)


def unconditional() -> Workflow:
    wf = Workflow("indomain_1_unconditional")
    ckpt, domain = _models(wf)
    pos, neg, latent = _prompts(wf, ckpt, "", pos_title="Positive prompt (ignored at cfg 0)", batch_size=4)
    sampler = _domain_ksampler(wf, None, COL_CONTROL, 0, "Domain KSampler (cfg 0 = unconditional, domain weight 2.0)",
                               ckpt[0], domain[0], pos[0], neg[0], latent[0], cfg=0.0)
    wf.group("3. Decoupled sampling", [sampler], GREEN)
    _output(wf, sampler[0], ckpt, "indomain/unconditional", x=COL_SAMPLE)
    wf.note("Unconditional in-domain generation.\n\ncfg (control weight) = 0: no text term, two model passes per "
            "step: u = base(x, empty prompt) and d = domain(x).\ndomain_weight 2.0 (1.5-2.5): how hard to pull "
            "into your domain. domain_weight 0 = the plain base model.\n25 steps dpmpp_2m karras.",
            (COL_MODELS, 330), size=(315, 230))
    return wf


def text_guided() -> Workflow:
    wf = Workflow("indomain_2_text_guided")
    ckpt, domain = _models(wf)
    pos, neg, latent = _prompts(wf, ckpt, "a cat wearing a hat, sitting on a chair", "blurry, low quality", batch_size=1)
    sampler = _domain_ksampler(wf, None, COL_CONTROL, 0, "Domain KSampler (cfg 2.5, domain weight 2.0)",
                               ckpt[0], domain[0], pos[0], neg[0], latent[0])
    wf.group("3. Decoupled sampling", [sampler], GREEN)
    _output(wf, sampler[0], ckpt, "indomain/text_guided", x=COL_SAMPLE)
    wf.note("Text-guided in-domain generation.\n\nThe frozen base model follows the prompt (cfg = control weight, "
            "start at 2.5); the domain UNet pulls towards your images (domain_weight, start at 2.0).\n"
            "domain_weight 0 gives exactly the core KSampler with the same cfg: use it to compare.\n"
            "25 steps dpmpp_2m karras.", (COL_MODELS, 330), size=(315, 250))
    return wf


def _controlnet_block(wf: Workflow, positive, negative, vae, y: int = 0, title: str = "Apply ControlNet (strength 1.0)"):
    cn = wf.add("ControlNetLoader", (COL_CONTROL, y), title="ControlNet (SD1.5)", size=(340, 58),
                control_net_name=CONTROLNET)
    hint = wf.add("LoadImage", (COL_CONTROL, y + 110), title="Control hint image (edges / depth / pose)",
                  size=(340, 314), image=HINT_IMAGE)
    apply = wf.add("ControlNetApplyAdvanced", (COL_CONTROL, y + 490), title=title, size=(340, 186),
                   positive=positive, negative=negative, control_net=cn[0], image=hint[0], strength=1.0,
                   start_percent=0.0, end_percent=1.0, vae=vae)
    wf.group("3. ControlNet", [cn, hint, apply], RED)
    return cn, hint, apply


def controlnet() -> Workflow:
    wf = Workflow("indomain_3_controlnet")
    ckpt, domain = _models(wf)
    pos, neg, latent = _prompts(wf, ckpt, "a cat sitting on a chair", "", batch_size=1)
    _, _, apply = _controlnet_block(wf, pos[0], neg[0], ckpt[2])
    sampler = _domain_ksampler(wf, None, COL_SAMPLE, 0, "Domain KSampler (cfg 2.5, domain weight 2.0)",
                               ckpt[0], domain[0], apply[0], apply[1], latent[0])
    wf.group("4. Decoupled sampling", [sampler], GREEN)
    _output(wf, sampler[0], ckpt, "indomain/controlnet", x=COL_OUT)
    wf.note("ControlNet-guided in-domain generation.\n\nThe ControlNet rides on the base model's text term "
            "(cfg 2.5). domain_on_controlnet decides whether the domain UNet also sees the hint: off = the "
            "domain pass is hint-free (the paper's default), on = both follow it.\ndomain_weight 2.0; "
            "25 steps dpmpp_2m karras.", (COL_MODELS, 330), size=(315, 260))
    return wf


def img2img() -> Workflow:
    wf = Workflow("indomain_4_img2img")
    ckpt, domain = _models(wf)
    pos, neg, _ = _prompts(wf, ckpt, "a cat sitting on a chair", "")
    image = wf.add("LoadImage", (COL_CONTROL, 0), title="Image to edit", size=(340, 314), image=INPUT_IMAGE)
    encode = wf.add("VAEEncode", (COL_CONTROL, 380), size=(210, 46), pixels=image[0], vae=ckpt[2])
    wf.group("3. Image to edit", [image, encode], RED)
    sampler = _domain_ksampler(wf, None, COL_SAMPLE, 0, "Domain KSampler (denoise 0.6 = edit, cfg 2.5, domain 2.0)",
                               ckpt[0], domain[0], pos[0], neg[0], encode[0], denoise=0.6)
    wf.group("4. Domain-guided editing", [sampler], GREEN)
    _output(wf, sampler[0], ckpt, "indomain/img2img", x=COL_OUT)
    wf.note("Domain-guided img2img editing.\n\nThe image is encoded, partly re-noised (denoise 0.6) and denoised "
            "with decoupled guidance, which moves it into your domain while keeping its layout.\nLower denoise "
            "keeps more of the input; higher denoise gives the domain more say.\ncfg 2.5, domain_weight 2.0, "
            "25 steps dpmpp_2m karras.", (COL_MODELS, 330), size=(315, 260))
    return wf


def multi_guidance() -> Workflow:
    wf = Workflow("indomain_5_multi_guidance")
    ckpt, domain = _models(wf)
    pos, neg, _ = _prompts(wf, ckpt, "a cat sitting on a chair", "", pos_title="Positive prompt (text term)")
    # The ControlNet term uses the EMPTY prompt with the hint: B(x, ∅ + hint) - u is the pure spatial direction.
    _, _, apply = _controlnet_block(wf, neg[0], neg[0], ckpt[2], title="Apply ControlNet to the empty prompt")
    x = COL_SAMPLE
    text = wf.add("InDomainGuidanceTerm", (x, 0), title="Term 1: text (w 2.5)", size=(340, 150),
                  model=ckpt[0], conditioning=pos[0], weight=2.5, start_percent=0.0, end_percent=1.0)
    spatial = wf.add("InDomainGuidanceTerm", (x, 210), title="Term 2: ControlNet (w 1.5)", size=(340, 150),
                     model=ckpt[0], conditioning=apply[0], weight=1.5, start_percent=0.0, end_percent=1.0,
                     previous=text[0])
    dom = wf.add("InDomainGuidanceTerm", (x, 420), title="Term 3: domain UNet (w 2.0)", size=(340, 150),
                 model=domain[0], conditioning=neg[0], weight=2.0, start_percent=0.0, end_percent=1.0,
                 previous=spatial[0])
    guider = wf.add("InDomainMultiGuider", (x, 630), title="Multi-Term Guider: u + sum w_i (M_i - u)",
                    size=(340, 80), model=ckpt[0], negative=neg[0], terms=dom[0])
    wf.group("4. Guidance terms", [text, spatial, dom, guider], GREEN)
    x2 = COL_OUT
    noise = wf.add("RandomNoise", (x2, 0), size=(315, 82), noise_seed=SEED)
    sampler_sel = wf.add("KSamplerSelect", (x2, 140), title="Sampler (dpmpp_2m)", size=(315, 58), sampler_name=SAMPLER)
    sigmas = wf.add("BasicScheduler", (x2, 250), title="Scheduler (karras, 25 steps)", size=(315, 106),
                    model=ckpt[0], scheduler=SCHEDULER, steps=STEPS, denoise=1.0)
    latent = wf.add("EmptyLatentImage", (x2, 410), size=(315, 106), width=SIZE, height=SIZE, batch_size=1)
    sample = wf.add("SamplerCustomAdvanced", (x2, 570), size=(315, 106), noise=noise[0], guider=guider[0],
                    sampler=sampler_sel[0], sigmas=sigmas[0], latent_image=latent[0])
    wf.group("5. Sampling", [noise, sampler_sel, sigmas, latent, sample], BLUE)
    _output(wf, sample[0], ckpt, "indomain/multi_guidance", x=2120)
    wf.note("Multi-guidance: eps = u + sum_i w_i (M_i(x, c_i) - u), u = base(x, negative).\n\nEach Guidance "
            "Term has its own model, condition, weight and schedule; chain as many as you like (a second domain "
            "UNet is one more term).\nStarting weights: text 2.5, ControlNet 1.5, domain 2.0; 25 steps "
            "dpmpp_2m karras. A weight of 0 skips that term's model pass.", (COL_MODELS, 330), size=(315, 280))
    return wf


def train_and_sample() -> Workflow:
    return _train_and_sample("indomain_6_train_and_sample", "Train Domain UNet (on a folder of images)", {},
                             "indomain/train_and_sample")


def train_lora_and_sample() -> Workflow:
    """The same with the LoRA form: a small adapter on the base's own weights (fits consumer GPUs)."""
    return _train_and_sample("indomain_9_train_lora_and_sample", "Train Domain UNet, LoRA form (rank 32)",
                             {"form": "lora", "rank": 32, "save_name": DOMAIN_UNET.removesuffix(".safetensors") + "_lora"},
                             "indomain/train_lora_and_sample",
                             "\n\nLoRA form: only a rank-32 adapter trains (the base stays frozen and shared), so "
                             "training needs about a quarter of the full form's memory and the file is a few "
                             "tens of MB; sampling runs the base's own UNet with the adapter, no second UNet.")


def _train_and_sample(name: str, train_title: str, widgets: dict, prefix: str, note_extra: str = "") -> Workflow:
    wf = Workflow(name)
    ckpt = wf.add("CheckpointLoaderSimple", (COL_MODELS, 0), title="Base checkpoint (frozen, SD1.5)",
                  size=(315, 98), ckpt_name=BASE_CKPT)
    wf.group("1. Base model", [ckpt], BLUE)
    train = wf.add("InDomainTrainDomainUNet", (COL_PROMPTS, 0), title=train_title,
                   size=(400, 440), model=ckpt[0], clip=ckpt[1], vae=ckpt[2], image_folder=TRAIN_FOLDER,
                   **dict(TRAIN_WIDGETS, **widgets))
    wf.group("2. Train the domain UNet", [train], RED)
    pos = wf.add("CLIPTextEncode", (COL_CONTROL, 0), title="Positive prompt (text control)", size=(360, 140),
                 text="a cat sitting on a chair", clip=ckpt[1])
    neg = wf.add("CLIPTextEncode", (COL_CONTROL, 200), title="Negative prompt (empty = unconditional)",
                 size=(360, 140), text="", clip=ckpt[1])
    latent = wf.add("EmptyLatentImage", (COL_CONTROL, 400), size=(315, 106), width=SIZE, height=SIZE, batch_size=1)
    wf.group("3. Prompts", [pos, neg, latent], ORANGE)
    sampler = _domain_ksampler(wf, None, COL_SAMPLE + 20, 0, "Domain KSampler (cfg 2.5, domain weight 2.0)",
                               ckpt[0], train[0], pos[0], neg[0], latent[0])
    wf.group("4. Sample with it", [sampler], GREEN)
    _output(wf, sampler[0], ckpt, prefix, x=COL_OUT + 60)
    wf.note("Train a domain UNet inside ComfyUI, then sample with it.\n\nPut images from your domain in a "
            "subfolder of ComfyUI/input (e.g. input/domain_images; no captions needed) and pick it in image_folder. Training is interruptible and shows progress; "
            "the result is saved under models/domain_unets and can later be loaded with 'Load Domain UNet'.\n"
            "Sampling: cfg 2.5, domain_weight 2.0, 25 steps dpmpp_2m karras." + note_extra, (COL_MODELS, 170),
            size=(315, 300))
    return wf


def domain_guidance_preset() -> Workflow:
    """Domain Guidance (Zhong et al., ICLR 2025): eps = u + w (F(x, c) - u) with u from the PRETRAINED model and
    F an ordinary fine-tune (text-conditioned), on the Guidance Term / Multi-Term Guider chain."""
    wf = Workflow("indomain_7_domain_guidance")
    base = wf.add("CheckpointLoaderSimple", (COL_MODELS, 0), title="Pretrained checkpoint (gives u)",
                  size=(315, 98), ckpt_name=BASE_CKPT)
    tuned = wf.add("CheckpointLoaderSimple", (COL_MODELS, 170), title="Fine-tuned checkpoint (your domain)",
                   size=(315, 98), ckpt_name=FINETUNED_CKPT)
    wf.group("1. Models", [base, tuned], BLUE)
    pos = wf.add("CLIPTextEncode", (COL_PROMPTS, 0), title="Positive prompt (read by the fine-tune)",
                 size=(400, 160), text="a cat sitting on a chair", clip=tuned[1])
    neg = wf.add("CLIPTextEncode", (COL_PROMPTS, 230), title="Negative prompt (empty = unconditional, pretrained)",
                 size=(400, 160), text="", clip=base[1])
    wf.group("2. Prompts", [pos, neg], ORANGE)
    x = COL_CONTROL
    term = wf.add("InDomainGuidanceTerm", (x, 0), title=f"Fine-tune term (w {DG_WEIGHT})", size=(340, 150),
                  model=tuned[0], conditioning=pos[0], weight=DG_WEIGHT, start_percent=0.0, end_percent=1.0)
    guider = wf.add("InDomainMultiGuider", (x, 210), title="Multi-Term Guider: u from the pretrained model",
                    size=(340, 80), model=base[0], negative=neg[0], terms=term[0])
    wf.group("3. Domain Guidance", [term, guider], GREEN)
    x2 = COL_SAMPLE
    noise = wf.add("RandomNoise", (x2, 0), size=(315, 82), noise_seed=SEED)
    sampler_sel = wf.add("KSamplerSelect", (x2, 140), title="Sampler (dpmpp_2m)", size=(315, 58), sampler_name=SAMPLER)
    sigmas = wf.add("BasicScheduler", (x2, 250), title="Scheduler (karras, 25 steps)", size=(315, 106),
                    model=base[0], scheduler=SCHEDULER, steps=STEPS, denoise=1.0)
    latent = wf.add("EmptyLatentImage", (x2, 410), size=(315, 106), width=SIZE, height=SIZE, batch_size=1)
    sample = wf.add("SamplerCustomAdvanced", (x2, 570), size=(315, 106), noise=noise[0], guider=guider[0],
                    sampler=sampler_sel[0], sigmas=sigmas[0], latent_image=latent[0])
    wf.group("4. Sampling", [noise, sampler_sel, sigmas, latent, sample], BLUE)
    _output(wf, sample[0], base, "indomain/domain_guidance", x=COL_OUT)
    wf.note("Domain Guidance preset (Zhong et al., ICLR 2025).\n\nAny ordinary fine-tune of the base (trained "
            "WITH captions) is the domain term; the unconditional u comes from the pretrained model, so guidance "
            f"does not forget: eps = u + w (F(x, c) - u).\nStart at w {DG_WEIGHT} (like cfg); lower it if the "
            "fine-tune's style overshoots. 25 steps dpmpp_2m karras.\nA LoRA: merge it into a checkpoint first "
            "(LoraLoader -> CheckpointSave) and load that here. Only images, no captions? Train a domain UNet "
            "instead (workflow 6) and use workflow 2; its w_d starts at 2.0.", (COL_MODELS, 330), size=(315, 330))
    return wf


def weight_grid() -> Workflow:
    wf = Workflow("indomain_8_weight_grid")
    ckpt, domain = _models(wf)
    pos, neg, latent = _prompts(wf, ckpt, "a cat wearing a hat, sitting on a chair", "", batch_size=1)
    grid = wf.add("InDomainWeightGrid", (COL_CONTROL, 0), title="Domain Weight Grid (rows w_d, columns cfg)",
                  size=(340, 400), model=ckpt[0], domain_model=domain[0], vae=ckpt[2], positive=pos[0],
                  negative=neg[0], latent_image=latent[0], seed=SEED, steps=STEPS, sampler_name=SAMPLER,
                  scheduler=SCHEDULER, domain_weights=GRID_DOMAIN_WEIGHTS, cfgs=GRID_CFGS)
    wf.group("3. Weight grid (one seed)", [grid], GREEN)
    save = wf.add("SaveImage", (COL_SAMPLE + 40, 0), title="Save the grid", size=(500, 520), images=grid[0],
                  filename_prefix="indomain/weight_grid")
    cells = wf.add("PreviewImage", (COL_SAMPLE + 580, 0), title="Cells (row by row)", size=(400, 420),
                   images=grid[1])
    wf.group("Output", [save, cells], PURPLE)
    wf.note("Choosing weights: one prompt, one seed, every domain weight x cfg pair.\n\nRows: domain_weights "
            f"({GRID_DOMAIN_WEIGHTS}); columns: cfgs ({GRID_CFGS}). Each cell is one Domain KSampler run with the "
            "same noise, so the grid costs rows x columns samplings (12 here, 25 steps dpmpp_2m karras each). "
            "Start around domain weight 2.0 and cfg 2.5; w_d 0 is the plain base model.", (COL_MODELS, 330),
            size=(315, 260))
    return wf


# ----------------------------------------------------------------------------- flow-matching DiT families
# One workflow per family (issue 19), wired like core's stock templates: UNETLoader + CLIPLoader (the family's type)
# + VAELoader, the family's latent node and shift node; the domain model is a text-free LoRA on the base's own
# weights (Load Domain UNet reads core-format LoRAs), text-free by the ENCODED EMPTY PROMPT fed to empty_prompt.

# name -> the tiny model family (devkit/tiny_families.py) the tests serve under the workflow's file names
DIT_WORKFLOWS: dict[str, str] = {}
# placeholder file name -> (model folder, tiny family, seed): what the tests put under that name
DIT_FILES: dict[str, tuple[str, str, int]] = {}
# text-encoder / VAE / clip-vision placeholder -> the tiny family whose stand-in the run test uses
DIT_ENCODERS: dict[str, str] = {}

COL_LOAD, COL_TEXT, COL_DIT_SAMPLE, COL_DIT_OUT = 0, 440, 920, 1340


def _dit_file(folder: str, name: str, family: str, seed: int = 0) -> str:
    DIT_FILES[name] = (folder, family, seed)
    return name


def _dit_loaders(wf: Workflow, family: str, unet: str, clip: str | tuple, clip_type: str | None, vae: str,
                 domain: str, shift_node: str | None, shift: float, base_title: str, seed: int = 0):
    """UNETLoader (+ shift node) -> Load Domain UNet, the text encoder and the VAE: group 1."""
    load = wf.add("UNETLoader", (COL_LOAD, 0), title=base_title, size=(360, 82),
                  unet_name=_dit_file("diffusion_models", unet, family, seed), weight_dtype="default")
    model, members = load, [load]
    if shift_node:
        model = wf.add(shift_node, (COL_LOAD, 130), title=f"Shift {shift} (as core's template)", size=(360, 58),
                       model=load[0], shift=shift)
        members.append(model)
    dom = wf.add("InDomainLoadDomainUNet", (COL_LOAD, 230), title="Load Domain UNet (text-free LoRA of this base)",
                 size=(360, 82), model=model[0], domain_unet_name=_dit_file("domain_unets", domain, family, seed))
    members.append(dom)
    if isinstance(clip, tuple):  # SD3.5: clip_l + clip_g + t5xxl
        enc = wf.add("TripleCLIPLoader", (COL_LOAD, 360), size=(360, 106), clip_name1=clip[0], clip_name2=clip[1],
                     clip_name3=clip[2])
        for c in clip:
            DIT_ENCODERS[c] = family
    else:
        enc = wf.add("CLIPLoader", (COL_LOAD, 360), title="Text encoder", size=(360, 106), clip_name=clip,
                     type=clip_type, device="default")
        DIT_ENCODERS[clip] = family
    vae_node = wf.add("VAELoader", (COL_LOAD, 520), size=(360, 58), vae_name=vae)
    DIT_ENCODERS[vae] = family
    members += [enc, vae_node]
    wf.group("1. Models (base, domain LoRA, text encoder, VAE)", members, BLUE)
    return model, dom, enc, vae_node


def _dit_prompts(wf: Workflow, clip, positive: str, negative: str, extra: list | None = None,
                 neg_title: str = "Negative prompt (u: the base's unconditional)"):
    """Positive, negative and the ENCODED EMPTY PROMPT (the domain pass's text): group 2."""
    pos = wf.add("CLIPTextEncode", (COL_TEXT, 0), title="Positive prompt (text control)", size=(400, 150),
                 text=positive, clip=clip[0])
    neg = wf.add("CLIPTextEncode", (COL_TEXT, 210), title=neg_title, size=(400, 150), text=negative, clip=clip[0])
    empty = wf.add("CLIPTextEncode", (COL_TEXT, 420), title="Empty prompt (domain pass: text-free)", size=(400, 100),
                   text="", clip=clip[0])
    wf.group("2. Prompts (empty prompt -> empty_prompt)", [pos, neg, empty] + (extra or []), ORANGE)
    return pos, neg, empty


def _dit_ksampler(wf: Workflow, x, y, model, domain, pos, neg, empty, latent, steps, cfg, sampler, scheduler,
                  title=None):
    return wf.add("InDomainKSampler", (x, y), title=title or f"Domain KSampler (cfg {cfg}, domain weight {DOMAIN_WEIGHT})",
                  size=(340, 500), model=model[0], domain_model=domain[0], seed=SEED, steps=steps, cfg=cfg,
                  domain_weight=DOMAIN_WEIGHT, sampler_name=sampler, scheduler=scheduler, positive=pos,
                  negative=neg, latent_image=latent, denoise=1.0, domain_on_controlnet=False,
                  domain_start_percent=0.0, domain_end_percent=1.0, empty_prompt=empty[0])


def _dit_output(wf: Workflow, samples, vae, prefix: str, video: bool, x: int = COL_DIT_OUT):
    decode = wf.add("VAEDecode", (x, 0), size=(210, 46), samples=samples, vae=vae[0])
    if video:
        save = wf.add("SaveAnimatedWEBP", (x, 100), size=(400, 460), images=decode[0], filename_prefix=prefix,
                      fps=16.0, lossless=False, quality=90, method="default")
    else:
        save = wf.add("SaveImage", (x, 100), size=(400, 420), images=decode[0], filename_prefix=prefix)
    wf.group("Output", [decode, save], PURPLE)
    return decode, save


_DIT_NOTE_TAIL = ("\n\nThe domain model is a text-free LoRA on this base's own weights (trained with empty captions, "
                  "e.g. by core's Train LoRA node; put it in models/domain_unets). The domain pass reads the ENCODED "
                  "EMPTY PROMPT (empty_prompt) plus the negative's non-text inputs; u is the base on your negative. "
                  "domain_weight 0 = core's sampler with the same cfg.")

WAN_NEGATIVE = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
                "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
                "三条腿，背景人很多，倒着走")
QWEN_TE, QWEN_VAE = "qwen_2.5_vl_7b_fp8_scaled.safetensors", "qwen_image_vae.safetensors"
WAN_TE, WAN_VAE = "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan_2.1_vae.safetensors"


def _register(name: str, family: str, wf: Workflow) -> Workflow:
    DIT_WORKFLOWS[name] = family
    return wf


def qwen_image() -> Workflow:
    name = "indomain_10_qwen_image"
    wf = Workflow(name)
    model, dom, clip, vae = _dit_loaders(wf, "qwen_image", "qwen_image_fp8_e4m3fn.safetensors", QWEN_TE, "qwen_image",
                                         QWEN_VAE, "my_qwen_image_domain.safetensors", "ModelSamplingAuraFlow", 3.1,
                                         "Qwen-Image (frozen base)")
    latent = wf.add("EmptySD3LatentImage", (COL_TEXT, 580), size=(315, 106), width=1328, height=1328, batch_size=1)
    pos, neg, empty = _dit_prompts(wf, clip, "a cat wearing a hat, sitting on a chair", "blurry, low quality",
                                   extra=[latent])
    ks = _dit_ksampler(wf, COL_DIT_SAMPLE, 0, model, dom, pos[0], neg[0], empty, latent[0], 20, 2.5, "euler", "simple")
    wf.group("3. Decoupled sampling", [ks], GREEN)
    _dit_output(wf, ks[0], vae, "indomain/qwen_image", video=False)
    wf.note("Qwen-Image, text-guided in-domain generation.\n\ncfg 2.5 (control weight), domain_weight 2.0, "
            "20 steps euler simple, shift 3.1 (core's template)." + _DIT_NOTE_TAIL, (COL_LOAD, 640), size=(360, 330))
    return _register(name, "qwen_image", wf)


def qwen_image_edit() -> Workflow:
    name = "indomain_11_qwen_image_edit"
    wf = Workflow(name)
    model, dom, clip, vae = _dit_loaders(wf, "qwen_image", "qwen_image_edit_fp8_e4m3fn.safetensors", QWEN_TE,
                                         "qwen_image", QWEN_VAE, "my_qwen_image_edit_domain.safetensors",
                                         "ModelSamplingAuraFlow", 3.0, "Qwen-Image-Edit (frozen base)", seed=1)
    image = wf.add("LoadImage", (COL_TEXT, 0), title="Image to edit", size=(340, 314), image=INPUT_IMAGE)
    scale = wf.add("ImageScale", (COL_TEXT, 380), title="Scale to 1024 x 1024 (about 1 megapixel)", size=(340, 130),
                   image=image[0], upscale_method="lanczos", width=1024, height=1024, crop="center")
    encode = wf.add("VAEEncode", (COL_TEXT, 540), size=(210, 46), pixels=scale[0], vae=vae[0])
    wf.group("2. Image to edit (its latent is the start and the reference)", [image, scale, encode], RED)
    x = COL_TEXT + 420
    pos = wf.add("TextEncodeQwenImageEdit", (x, 0), title="Edit instruction (with the image: reference latent)",
                 size=(400, 170), prompt="make it a watercolor painting", clip=clip[0], vae=vae[0], image=scale[0])
    neg = wf.add("TextEncodeQwenImageEdit", (x, 240), title="Negative (with the image: u keeps the reference)",
                 size=(400, 170), prompt="", clip=clip[0], vae=vae[0], image=scale[0])
    empty = wf.add("CLIPTextEncode", (x, 480), title="Empty prompt (domain pass: text-free)", size=(400, 100),
                   text="", clip=clip[0])
    wf.group("3. Prompts (the reference latent rides on positive and negative)", [pos, neg, empty], ORANGE)
    ks = _dit_ksampler(wf, x + 440, 0, model, dom, pos[0], neg[0], empty, encode[0], 20, 2.5, "euler", "simple")
    wf.group("4. Decoupled sampling", [ks], GREEN)
    _dit_output(wf, ks[0], vae, "indomain/qwen_image_edit", video=False, x=x + 860)
    wf.note("Qwen-Image-Edit, domain-guided editing.\n\nTextEncodeQwenImageEdit attaches the image's reference "
            "latent to the instruction and to the negative; the domain pass takes the negative's reference latent "
            "with the empty prompt's text, so u, the edit term and the domain term all see the image.\ncfg 2.5, "
            "domain_weight 2.0, 20 steps euler simple, shift 3.0." + _DIT_NOTE_TAIL, (COL_LOAD, 640), size=(360, 380))
    return _register(name, "qwen_image", wf)


def _wan_latent(wf, x, y, width, height, length):
    return wf.add("EmptyHunyuanLatentVideo", (x, y), title="Video size (Wan)", size=(315, 130), width=width,
                  height=height, length=length, batch_size=1)


def wan21_t2v() -> Workflow:
    name = "indomain_12_wan21_t2v"
    wf = Workflow(name)
    model, dom, clip, vae = _dit_loaders(wf, "wan21", "wan2.1_t2v_1.3B_fp16.safetensors", WAN_TE, "wan", WAN_VAE,
                                         "my_wan21_t2v_domain.safetensors", "ModelSamplingSD3", 8.0,
                                         "Wan 2.1 T2V (frozen base)")
    latent = _wan_latent(wf, COL_TEXT, 580, 832, 480, 33)
    pos, neg, empty = _dit_prompts(wf, clip, "a cat walking through tall grass, sunny day", WAN_NEGATIVE,
                                   extra=[latent], neg_title="Negative prompt (Wan's stock negative: u)")
    ks = _dit_ksampler(wf, COL_DIT_SAMPLE, 0, model, dom, pos[0], neg[0], empty, latent[0], 30, 6.0, "uni_pc", "simple")
    wf.group("3. Decoupled sampling", [ks], GREEN)
    _dit_output(wf, ks[0], vae, "indomain/wan21_t2v", video=True)
    wf.note("Wan 2.1 text-to-video in your domain.\n\nThe negative (Wan's long stock text) gives u; the domain "
            "pass reads the EMPTY prompt, not the negative.\ncfg 6.0, domain_weight 2.0, 30 steps uni_pc simple, "
            "shift 8." + _DIT_NOTE_TAIL, (COL_LOAD, 640), size=(360, 340))
    return _register(name, "wan21", wf)


def wan21_i2v() -> Workflow:
    name = "indomain_13_wan21_i2v"
    wf = Workflow(name)
    model, dom, clip, vae = _dit_loaders(wf, "wan21_i2v", "wan2.1_i2v_480p_14B_fp16.safetensors", WAN_TE, "wan",
                                         WAN_VAE, "my_wan21_i2v_domain.safetensors", "ModelSamplingSD3", 8.0,
                                         "Wan 2.1 I2V (frozen base)")
    pos, neg, empty = _dit_prompts(wf, clip, "the cat turns its head and blinks", WAN_NEGATIVE,
                                   neg_title="Negative prompt (Wan's stock negative: u)")
    x = COL_TEXT + 440
    cv = wf.add("CLIPVisionLoader", (x, 0), size=(340, 58), clip_name="clip_vision_h.safetensors")
    DIT_ENCODERS["clip_vision_h.safetensors"] = "wan21_i2v"
    image = wf.add("LoadImage", (x, 110), title="Start image", size=(340, 314), image=INPUT_IMAGE)
    cve = wf.add("CLIPVisionEncode", (x, 480), size=(340, 78), clip_vision=cv[0], image=image[0], crop="none")
    i2v = wf.add("WanImageToVideo", (x, 620), title="Wan Image to Video (concat latent + clip vision on both)",
                 size=(340, 210), positive=pos[0], negative=neg[0], vae=vae[0], clip_vision_output=cve[0],
                 start_image=image[0], width=512, height=512, length=33, batch_size=1)
    wf.group("3. Start image (reaches u, the text term and the domain term)", [cv, image, cve, i2v], RED)
    ks = _dit_ksampler(wf, x + 400, 0, model, dom, i2v[0], i2v[1], empty, i2v[2], 20, 6.0, "uni_pc", "simple")
    wf.group("4. Decoupled sampling", [ks], GREEN)
    _dit_output(wf, ks[0], vae, "indomain/wan21_i2v", video=True, x=x + 820)
    wf.note("Wan 2.1 image-to-video in your domain.\n\nWanImageToVideo puts the start image's concat latent and "
            "clip-vision output on positive and negative; the domain pass takes them from the negative with the "
            "empty prompt's text (only the text is removed).\ncfg 6.0, domain_weight 2.0, 20 steps uni_pc simple, "
            "shift 8." + _DIT_NOTE_TAIL, (COL_LOAD, 640), size=(360, 380))
    return _register(name, "wan21_i2v", wf)


def wan22_two_experts() -> Workflow:
    """Core's stock Wan 2.2 14B layout (two experts, two KSamplerAdvanced split at step 10 of 20), with one domain
    LoRA per expert applied by Apply Domain Guidance on each expert's model."""
    name = "indomain_14_wan22_two_experts"
    wf = Workflow(name)
    members = []
    experts = []
    for i, (which, seed) in enumerate((("high", 0), ("low", 1))):
        y = i * 300
        load = wf.add("UNETLoader", (COL_LOAD, y), title=f"Wan 2.2 {which}-noise expert (frozen)", size=(360, 82),
                      unet_name=_dit_file("diffusion_models", f"wan2.2_t2v_{which}_noise_14B_fp8_scaled.safetensors",
                                          "wan21", seed), weight_dtype="default")
        shift = wf.add("ModelSamplingSD3", (COL_LOAD, y + 120), title="Shift 8.0", size=(360, 58), model=load[0],
                       shift=8.0)
        dom = wf.add("InDomainLoadDomainUNet", (COL_LOAD, y + 210), title=f"Domain LoRA of the {which}-noise expert",
                     size=(360, 82), model=shift[0],
                     domain_unet_name=_dit_file("domain_unets", f"my_wan22_{which}_noise_domain.safetensors", "wan21",
                                                seed))
        members += [load, shift, dom]
        experts.append((shift, dom))
    clip = wf.add("CLIPLoader", (COL_LOAD, 620), title="Text encoder", size=(360, 106), clip_name=WAN_TE, type="wan",
                  device="default")
    vae = wf.add("VAELoader", (COL_LOAD, 780), size=(360, 58), vae_name=WAN_VAE)
    DIT_ENCODERS[WAN_TE] = DIT_ENCODERS[WAN_VAE] = "wan21"
    wf.group("1. Models (two experts, a domain LoRA each)", members + [clip, vae], BLUE)
    latent = _wan_latent(wf, COL_TEXT, 580, 640, 640, 81)
    pos, neg, empty = _dit_prompts(wf, clip, "a cat walking through tall grass, sunny day", WAN_NEGATIVE,
                                   extra=[latent], neg_title="Negative prompt (Wan's stock negative: u)")
    x = COL_DIT_SAMPLE
    patched, samplers = [], []
    for i, ((shift, dom), which) in enumerate(zip(experts, ("high", "low"))):
        patched.append(wf.add("InDomainApplyGuidance", (x, i * 560), title=f"Apply Domain Guidance ({which}-noise "
                              f"expert, w_d {DOMAIN_WEIGHT})", size=(340, 190), model=shift[0], domain_model=dom[0],
                              domain_weight=DOMAIN_WEIGHT, domain_on_controlnet=False, domain_start_percent=0.0,
                              domain_end_percent=1.0, empty_prompt=empty[0]))
    x2 = x + 400
    high = wf.add("KSamplerAdvanced", (x2, 0), title="KSampler (Advanced): high-noise steps 0-10",
                  size=(340, 334), model=patched[0][0], add_noise="enable", noise_seed=SEED, steps=20, cfg=3.5,
                  sampler_name="euler", scheduler="simple", positive=pos[0], negative=neg[0], latent_image=latent[0],
                  start_at_step=0, end_at_step=10, return_with_leftover_noise="enable")
    low = wf.add("KSamplerAdvanced", (x2, 560), title="KSampler (Advanced): low-noise steps 10-20",
                 size=(340, 334), model=patched[1][0], add_noise="disable", noise_seed=0, steps=20, cfg=3.5,
                 sampler_name="euler", scheduler="simple", positive=pos[0], negative=neg[0], latent_image=high[0],
                 start_at_step=10, end_at_step=10000, return_with_leftover_noise="disable")
    wf.group("3. Two experts, each with its domain term (step split 10 of 20)", patched + [high, low], GREEN)
    _dit_output(wf, low[0], vae, "indomain/wan22_two_experts", video=True, x=x2 + 420)
    wf.note("Wan 2.2 14B text-to-video with its two experts, as core's template: the high-noise expert runs steps "
            "0-10 and the low-noise expert steps 10-20 (KSampler Advanced). Each expert has its own domain LoRA "
            "(trained on that expert) applied by Apply Domain Guidance, so the domain term switches with the "
            "expert.\ncfg 3.5, domain_weight 2.0 on both, 20 steps euler simple, shift 8." + _DIT_NOTE_TAIL,
            (COL_LOAD, 900), size=(360, 420))
    return _register(name, "wan21", wf)


def z_image() -> Workflow:
    name = "indomain_15_z_image"
    wf = Workflow(name)
    model, dom, clip, vae = _dit_loaders(wf, "zimage", "z_image_bf16.safetensors", "qwen_3_4b.safetensors", "lumina2",
                                         "ae.safetensors", "my_z_image_domain.safetensors", "ModelSamplingAuraFlow",
                                         3.0, "Z-Image base (frozen; Lumina 2 works the same)")
    latent = wf.add("EmptySD3LatentImage", (COL_TEXT, 580), size=(315, 106), width=1024, height=1024, batch_size=1)
    pos, neg, empty = _dit_prompts(wf, clip, "a cat wearing a hat, sitting on a chair", "blurry, low quality",
                                   extra=[latent])
    ks = _dit_ksampler(wf, COL_DIT_SAMPLE, 0, model, dom, pos[0], neg[0], empty, latent[0], 30, 4.0, "euler", "simple")
    wf.group("3. Decoupled sampling", [ks], GREEN)
    _dit_output(wf, ks[0], vae, "indomain/z_image", video=False)
    wf.note("Z-Image (base, real CFG) / Lumina 2, text-guided in-domain generation.\n\nLumina 2: its model file, "
            "its text encoder (gemma 2 2B, type lumina2) and shift 6.\ncfg 4.0, domain_weight 2.0, 30 steps euler "
            "simple, shift 3.0. Z-Image-Turbo (distilled, cfg 1) is not a base for this." + _DIT_NOTE_TAIL,
            (COL_LOAD, 640), size=(360, 360))
    return _register(name, "zimage", wf)


def sd35() -> Workflow:
    name = "indomain_16_sd35"
    wf = Workflow(name)
    model, dom, clip, vae = _dit_loaders(wf, "sd3", "sd3.5_medium.safetensors",
                                         ("clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors"), None,
                                         "sd35_vae.safetensors", "my_sd35_domain.safetensors", "ModelSamplingSD3", 3.0,
                                         "SD3.5 (frozen base)")
    latent = wf.add("EmptySD3LatentImage", (COL_TEXT, 580), size=(315, 106), width=1024, height=1024, batch_size=1)
    pos, neg, empty = _dit_prompts(wf, clip, "a cat wearing a hat, sitting on a chair", "blurry, low quality",
                                   extra=[latent])
    ks = _dit_ksampler(wf, COL_DIT_SAMPLE, 0, model, dom, pos[0], neg[0], empty, latent[0], 28, 4.5, "euler",
                       "sgm_uniform")
    wf.group("3. Decoupled sampling", [ks], GREEN)
    _dit_output(wf, ks[0], vae, "indomain/sd35", video=False)
    wf.note("SD3.5 (MMDiT), text-guided in-domain generation.\n\ncfg 4.5, domain_weight 2.0, 28 steps euler "
            "sgm_uniform, shift 3.0." + _DIT_NOTE_TAIL, (COL_LOAD, 640), size=(360, 320))
    return _register(name, "sd3", wf)


def flux2_klein() -> Workflow:
    name = "indomain_17_flux2_klein"
    wf = Workflow(name)
    model, dom, clip, vae = _dit_loaders(wf, "flux2", "flux-2-klein-base-4b.safetensors", "qwen_3_4b.safetensors",
                                         "flux2", "flux2-vae.safetensors", "my_flux2_klein_domain.safetensors", None,
                                         0.0, "Flux.2 Klein base (frozen; real CFG)")
    pos, neg, empty = _dit_prompts(wf, clip, "a cat wearing a hat, sitting on a chair", "")
    x = COL_DIT_SAMPLE
    guider = wf.add("InDomainGuider", (x, 0), title=f"Domain Guider (cfg 4.0, domain weight {DOMAIN_WEIGHT})",
                    size=(340, 300), model=model[0], domain_model=dom[0], positive=pos[0], negative=neg[0], cfg=4.0,
                    domain_weight=DOMAIN_WEIGHT, domain_on_controlnet=False, domain_start_percent=0.0,
                    domain_end_percent=1.0, empty_prompt=empty[0])
    wf.group("3. Decoupled guidance", [guider], GREEN)
    x2 = x + 400
    noise = wf.add("RandomNoise", (x2, 0), size=(315, 82), noise_seed=SEED)
    sampler_sel = wf.add("KSamplerSelect", (x2, 140), title="Sampler (euler)", size=(315, 58), sampler_name="euler")
    sigmas = wf.add("Flux2Scheduler", (x2, 250), title="Flux.2 scheduler (50 steps)", size=(315, 106), steps=50,
                    width=1024, height=1024)
    latent = wf.add("EmptyFlux2LatentImage", (x2, 410), size=(315, 106), width=1024, height=1024, batch_size=1)
    sample = wf.add("SamplerCustomAdvanced", (x2, 570), size=(315, 106), noise=noise[0], guider=guider[0],
                    sampler=sampler_sel[0], sigmas=sigmas[0], latent_image=latent[0])
    wf.group("4. Sampling", [noise, sampler_sel, sigmas, latent, sample], BLUE)
    _dit_output(wf, sample[0], vae, "indomain/flux2_klein", video=False, x=x2 + 400)
    wf.note("Flux.2 Klein base (real CFG), text-guided in-domain generation with the Domain Guider on "
            "SamplerCustomAdvanced.\n\ncfg 4.0, domain_weight 2.0, 50 steps euler (Flux.2 scheduler). Chroma works "
            "the same (CLIPLoader type chroma, EmptySD3LatentImage). Distilled Klein (4 steps, cfg 1) is not a base "
            "for this." + _DIT_NOTE_TAIL, (COL_LOAD, 640), size=(360, 380))
    return _register(name, "flux2", wf)


DIT_SPECS = [qwen_image, qwen_image_edit, wan21_t2v, wan21_i2v, wan22_two_experts, z_image, sd35, flux2_klein]


# ----------------------------------------------------------------------------- train a DiT domain, then sample (issue 20)
# name -> the tiny family the tests train and sample in its place
DIT_TRAIN_WORKFLOWS: dict[str, str] = {}

_DIT_TRAIN_NOTE = ("\n\nPut images from your domain in a subfolder of ComfyUI/input (e.g. input/domain_images; no "
                   "captions) and pick it in image_folder. The Train node gets the ENCODED EMPTY PROMPT (empty_prompt; "
                   "'clip' stays unconnected) and the VAE, which encodes each image once (cached). It trains a "
                   "text-free LoRA (form lora, rank 32, learning rate 0 = auto 1e-4) on the model's own flow-matching "
                   "objective with the shift set above, saves it under models/domain_unets (reload it later with Load "
                   "Domain UNet), and hands it to Domain KSampler, whose domain pass reads the same empty prompt. "
                   "Every 250 steps (preview_every; 0 = off) the node shows a decoupled sample of the EMA adapter.")


def _dit_train_and_sample(name: str, family: str, unet: str, clip, clip_type, vae: str, shift_node: str,
                          shift: float, base_title: str, resolution: int, save_name: str, latent_node: str,
                          latent_values: dict, positive: str, negative: str, steps: int, cfg: float, sampler: str,
                          scheduler: str, video: bool, prefix: str, note_head: str) -> Workflow:
    """UNETLoader + shift, text encoder, VAE -> Train Domain UNet (LoRA form, on an image folder, the empty prompt)
    -> Domain KSampler with the trained model and the same empty prompt -> output."""
    wf = Workflow(name)
    load = wf.add("UNETLoader", (COL_LOAD, 0), title=base_title, size=(360, 82),
                  unet_name=_dit_file("diffusion_models", unet, family), weight_dtype="default")
    # no shift node: the model's own sampling shift (Chroma: 1.0) for training and sampling
    model = (wf.add(shift_node, (COL_LOAD, 130), title=f"Shift {shift} (training and sampling)", size=(360, 58),
                    model=load[0], shift=shift) if shift_node else load)
    if isinstance(clip, tuple):  # SD3.5: clip_l + clip_g + t5xxl
        enc = wf.add("TripleCLIPLoader", (COL_LOAD, 230), size=(360, 106), clip_name1=clip[0], clip_name2=clip[1],
                     clip_name3=clip[2])
        for c in clip:
            DIT_ENCODERS[c] = family
    else:
        enc = wf.add("CLIPLoader", (COL_LOAD, 230), title="Text encoder", size=(360, 106), clip_name=clip,
                     type=clip_type, device="default")
        DIT_ENCODERS[clip] = family
    vae_node = wf.add("VAELoader", (COL_LOAD, 390), size=(360, 58), vae_name=vae)
    DIT_ENCODERS[vae] = family
    wf.group("1. Models (base, text encoder, VAE)", [load] + ([model] if shift_node else []) + [enc, vae_node], BLUE)
    empty = wf.add("CLIPTextEncode", (COL_TEXT, 0), title="Empty prompt (text-free: training and domain pass)",
                   size=(400, 100), text="", clip=enc[0])
    train = wf.add("InDomainTrainDomainUNet", (COL_TEXT, 160), title="Train Domain UNet, LoRA form (rank 32)",
                   size=(400, 790), model=model[0], vae=vae_node[0], image_folder=TRAIN_FOLDER,
                   empty_prompt=empty[0],
                   **dict(TRAIN_WIDGETS, form="lora", rank=32, resolution=resolution, save_name=save_name,
                          preview_every=250))
    wf.group("2. Train the domain (text-free LoRA)", [empty, train], RED)
    x = COL_TEXT + 440
    pos = wf.add("CLIPTextEncode", (x, 0), title="Positive prompt (text control)", size=(400, 150), text=positive,
                 clip=enc[0])
    neg = wf.add("CLIPTextEncode", (x, 210), title="Negative prompt (u: the base's unconditional)", size=(400, 150),
                 text=negative, clip=enc[0])
    latent = wf.add(latent_node, (x, 420), size=(315, 130), **latent_values)
    wf.group("3. Prompts", [pos, neg, latent], ORANGE)
    ks = _dit_ksampler(wf, x + 440, 0, model, train, pos[0], neg[0], empty, latent[0], steps, cfg, sampler, scheduler)
    wf.group("4. Sample with it (decoupled)", [ks], GREEN)
    _dit_output(wf, ks[0], vae_node, prefix, video=video, x=x + 860)
    wf.note(note_head + f"\n\nTraining: {TRAIN_WIDGETS.get('steps', 2000)} steps at {resolution} px, LoRA rank "
            f"32. Sampling: cfg {cfg}, domain_weight "
            f"{DOMAIN_WEIGHT}, {steps} steps {sampler} {scheduler}" + (f", shift {shift}." if shift_node else
                                                                     ", the model's own shift.") + _DIT_TRAIN_NOTE,
            (COL_LOAD, 500), size=(360, 470))
    DIT_TRAIN_WORKFLOWS[name] = family
    return wf


def train_qwen_image() -> Workflow:
    return _dit_train_and_sample(
        "indomain_18_train_qwen_image", "qwen_image", "qwen_image_fp8_e4m3fn.safetensors", QWEN_TE, "qwen_image",
        QWEN_VAE, "ModelSamplingAuraFlow", 3.1, "Qwen-Image (frozen base)", 1024, "qwen_image_domain",
        "EmptySD3LatentImage", dict(width=1328, height=1328, batch_size=1), "a cat wearing a hat, sitting on a chair",
        "blurry, low quality", 20, 2.5, "euler", "simple", False, "indomain/train_qwen_image",
        "Qwen-Image: train your domain, then sample in it.")


def train_wan21() -> Workflow:
    return _dit_train_and_sample(
        "indomain_19_train_wan21", "wan21", "wan2.1_t2v_1.3B_fp16.safetensors", WAN_TE, "wan", WAN_VAE,
        "ModelSamplingSD3", 8.0, "Wan 2.1 T2V (frozen base)", 512, "wan21_domain", "EmptyHunyuanLatentVideo",
        dict(width=832, height=480, length=33, batch_size=1), "a cat walking through tall grass, sunny day",
        WAN_NEGATIVE, 30, 6.0, "uni_pc", "simple", True, "indomain/train_wan21",
        "Wan 2.1: train your domain from IMAGES, then make videos in it.\n\nEach image trains as a single-frame "
        "clip (the Wan VAE encodes it alone); video clips are not needed. Wan 2.2 5B works the same with its own "
        "model, VAE (16x: sizes follow the VAE) and shift.")


def train_z_image() -> Workflow:
    return _dit_train_and_sample(
        "indomain_20_train_z_image", "zimage", "z_image_bf16.safetensors", "qwen_3_4b.safetensors", "lumina2",
        "ae.safetensors", "ModelSamplingAuraFlow", 3.0, "Z-Image base (frozen; Lumina 2 works the same)", 1024,
        "z_image_domain", "EmptySD3LatentImage", dict(width=1024, height=1024, batch_size=1),
        "a cat wearing a hat, sitting on a chair", "blurry, low quality", 30, 4.0, "euler", "simple", False,
        "indomain/train_z_image", "Z-Image (base) / Lumina 2: train your domain, then sample in it.")


def train_sd35() -> Workflow:
    return _dit_train_and_sample(
        "indomain_21_train_sd35", "sd3", "sd3.5_medium.safetensors",
        ("clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors"), None, "sd35_vae.safetensors",
        "ModelSamplingSD3", 3.0, "SD3.5 (frozen base)", 1024, "sd35_domain", "EmptySD3LatentImage",
        dict(width=1024, height=1024, batch_size=1), "a cat wearing a hat, sitting on a chair", "blurry, low quality",
        28, 4.5, "euler", "sgm_uniform", False, "indomain/train_sd35",
        "SD3.5 (MMDiT): train your domain, then sample in it.")


def train_chroma() -> Workflow:
    return _dit_train_and_sample(
        "indomain_22_train_chroma", "chroma", "chroma-unlocked-v50.safetensors", "t5xxl_fp16.safetensors", "chroma",
        "ae.safetensors", None, 1.0, "Chroma (frozen base)", 1024, "chroma_domain", "EmptySD3LatentImage",
        dict(width=1024, height=1024, batch_size=1), "a cat wearing a hat, sitting on a chair", "blurry, low quality",
        26, 4.0, "euler", "beta", False, "indomain/train_chroma",
        "Chroma (a Flux-shaped base with real CFG): train your domain, then sample in it.")


DIT_TRAIN_SPECS = [train_qwen_image, train_wan21, train_z_image, train_sd35, train_chroma]
for _spec in DIT_SPECS + DIT_TRAIN_SPECS:  # fill DIT_WORKFLOWS / DIT_TRAIN_WORKFLOWS / DIT_FILES / DIT_ENCODERS
    _spec()
del _spec


# Starting values of the two presets.
DG_WEIGHT = 5.0
GRID_DOMAIN_WEIGHTS, GRID_CFGS = "0, 1, 2, 3", "1.5, 2.5, 4"




def _train_widgets(object_info: dict) -> dict:
    """Defaults of InDomainTrainDomainUNet's widgets (its own choices), with a friendly save name."""
    info = object_info["InDomainTrainDomainUNet"]
    values = {}
    for name, spec, optional in ordered_inputs(info):
        if name in ("model", "clip", "vae", "image_folder") or not is_widget(spec):
            continue
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if name == "save_name":
            values[name] = DOMAIN_UNET.removesuffix(".safetensors")
        elif "default" in opts:
            values[name] = opts["default"]
        elif isinstance(spec[0], list) and spec[0]:
            values[name] = spec[0][0]
        elif spec[0] == "COMBO" and opts.get("options"):
            values[name] = opts["options"][0]
        elif not optional:
            raise KeyError(f"InDomainTrainDomainUNet input {name!r} has no default; give it a value in the spec")
    return values


SPECS = [unconditional, text_guided, controlnet, img2img, multi_guidance, train_and_sample, train_lora_and_sample,
         domain_guidance_preset, weight_grid] + DIT_SPECS + DIT_TRAIN_SPECS
TRAIN_SPECS = (train_and_sample, train_lora_and_sample, *DIT_TRAIN_SPECS)


def build_all(object_info: dict) -> dict[str, tuple[dict, dict]]:
    """name -> (ui, api) for every workflow whose nodes exist in object_info."""
    result = {}
    if "InDomainTrainDomainUNet" in object_info:
        TRAIN_WIDGETS.clear()
        TRAIN_WIDGETS.update(_train_widgets(object_info))
    for spec in SPECS:
        if spec in TRAIN_SPECS and "InDomainTrainDomainUNet" not in object_info:
            print("skipping the training workflow: InDomainTrainDomainUNet is not registered", file=sys.stderr)
            continue
        wf = spec()
        missing = sorted({n.type for n in wf.nodes if n.type not in FRONTEND_ONLY} - set(object_info))
        if missing:
            print(f"skipping {wf.name}: node types {missing} are not registered", file=sys.stderr)
            continue
        result[wf.name] = (wf.ui(object_info), wf.api(object_info))
    return result


def live_object_info() -> dict:
    """/object_info of a real ComfyUI server with this pack installed (no models needed)."""
    from .host import ComfyServer

    with tempfile.TemporaryDirectory(prefix="indomain_oi_") as d:
        with ComfyServer(Path(d)) as srv:
            return srv.get_json("/object_info")


def dumps(obj: dict) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only compare with the files on disk; exit 1 if stale")
    args = ap.parse_args(argv)
    built = build_all(live_object_info())
    stale = []
    API_DIR.mkdir(parents=True, exist_ok=True)
    TEMPLATES_DIR.mkdir(parents=True, exist_ok=True)
    for name, (ui, api) in built.items():
        for path, obj in ((TEMPLATES_DIR / f"{name}.json", ui), (API_DIR / f"{name}.json", api)):
            text = dumps(obj)
            if path.exists() and path.read_text() == text:
                continue
            stale.append(path)
            if not args.check:
                _write(path, text)
    verb = "stale" if args.check else "written"
    for p in stale:
        print(f"{verb}: {p.relative_to(PACK_ROOT)}")
    print(f"{len(built)} workflows, {len(stale)} file(s) {verb}")
    return 1 if (args.check and stale) else 0



# ----------------------------------------------------------------------------- for tests and the demo

def tiny_model_names() -> dict[str, str]:
    """Placeholder file name -> the tiny model names the test `server` fixture serves."""
    return {BASE_CKPT: "tiny_sd15.safetensors", DOMAIN_UNET: "tiny_domain.safetensors",
            CONTROLNET: "tiny_controlnet.safetensors", FINETUNED_CKPT: TINY_FINETUNED}


# The Domain Guidance preset's fine-tune in tests: another tiny checkpoint (different weights, same layout).
TINY_FINETUNED = "tiny_sd15_finetuned.safetensors"


def tiny_finetuned_checkpoint() -> Path:
    from .tiny_models import tiny_checkpoint

    return tiny_checkpoint(1)


def substitute(obj, mapping: dict):
    """A copy of a workflow (UI or API) with every string value found in mapping replaced."""
    if isinstance(obj, dict):
        return {k: substitute(v, mapping) for k, v in obj.items()}
    if isinstance(obj, list):
        return [substitute(v, mapping) for v in obj]
    if isinstance(obj, str) and obj in mapping:
        return mapping[obj]
    return obj


def workflow_files() -> list[tuple[str, Path, Path]]:
    """(name, ui_path, api_path) for every shared workflow on disk."""
    return [(p.stem, p, API_DIR / p.name) for p in sorted(TEMPLATES_DIR.glob("*.json"))]


def thumbnail_path(name: str) -> Path:
    return TEMPLATES_DIR / f"{name}.jpg"


def write_thumbnail(screenshot: Path, name: str) -> Path:
    """The template browser's thumbnail for a workflow: the real frontend's screenshot, scaled, as JPEG."""
    from PIL import Image

    target = thumbnail_path(name)
    with Image.open(screenshot) as im:
        im = im.convert("RGB")
        im.thumbnail(THUMBNAIL_SIZE)
        tmp = target.with_name(target.name + ".tmp")
        im.save(tmp, format="JPEG", quality=82, optimize=True)
    os.replace(tmp, target)
    if name in HELP_PICTURES:  # the node help pages (web/docs/*.md) show some of them
        HELP_IMAGES_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(target, HELP_IMAGES_DIR / target.name)
    return target


# Thumbnails the node help pages use (web/docs/images/<name>.jpg).
HELP_IMAGES_DIR = PACK_ROOT / "web" / "docs" / "images"
HELP_PICTURES = {"indomain_2_text_guided", "indomain_5_multi_guidance", "indomain_6_train_and_sample",
                 "indomain_8_weight_grid"}


def write_test_images(folder: Path, size: int = 64) -> dict[str, Path]:
    """The images the workflows' LoadImage nodes name (hint and image to edit), drawn with PIL."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    hint = Image.new("RGB", (size, size), "black")
    d = ImageDraw.Draw(hint)
    d.ellipse([size // 4, size // 4, 3 * size // 4, 3 * size // 4], outline="white", width=max(1, size // 16))
    photo = Image.new("RGB", (size, size), (40, 90, 160))
    d = ImageDraw.Draw(photo)
    d.rectangle([size // 5, size // 3, 4 * size // 5, 4 * size // 5], fill=(220, 160, 40))
    paths = {HINT_IMAGE: folder / HINT_IMAGE, INPUT_IMAGE: folder / INPUT_IMAGE}
    hint.save(paths[HINT_IMAGE])
    photo.save(paths[INPUT_IMAGE])
    return paths


def write_train_images(folder: Path, count: int = 8, size: int = 64, seed: int = 0) -> Path:
    """A small 'domain' of procedural images (warm striped discs on a dark ground)."""
    from .images import draw_images

    return draw_images(folder, count, size, seed, style="discs")


if __name__ == "__main__":
    sys.exit(main())
