"""Issue 22, the trainer's defects (items 4, 5, 7, 8, 11 and the Extract Domain LoRA follow-ups), each checked on
the real ComfyUI with the tiny SD15-layout checkpoint: a diverging run at the default fp16 save is reported as
diverging; LoRA-form previews copy only the adapter; a LoRA-form resume refuses another base (or the base plus a
LoRA); the Train node reads nothing through a link out of input/; each form trains at its own default learning
rate; Extract uses the base's own CPU weights whatever is loaded, under the training lock."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from indomain.devkit.images import make_image_folder
from indomain.guidance.checkpoint import read_domain_checkpoint
from indomain.training.data import TrainingInputError
from indomain.training.trainer import TrainConfig, TrainingDiverged, train


@pytest.fixture(scope="module")
def images(session_dir):
    folder = session_dir / "issue22_images"
    if not folder.exists():
        make_image_folder(folder, 4, 64, seed=22, nested=False)
    return folder


@pytest.fixture
def input_folder(comfy):
    """A fresh subfolder of ComfyUI's input folder (the Train node reads only there); removed afterwards."""
    import folder_paths

    name = f"indomain_i22_{uuid.uuid4().hex[:8]}"
    folder = Path(folder_paths.get_input_directory()) / name
    folder.mkdir(parents=True)
    yield name, folder
    shutil.rmtree(folder, ignore_errors=True)


def cfg(session_dir, **kw):
    base = dict(steps=2, batch_size=2, resolution=64, seed=1, save_every=0, cache_dir=str(session_dir / "latent_cache"))
    base.update(kw)
    return TrainConfig(**base)


def _dtypes(path: Path) -> set:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys() if not k.endswith(("attn2.constant", ".alpha"))}


# ----------------------------------------------------------------------------- item 4: divergence at fp16


def test_a_diverging_run_at_the_default_fp16_save_stops_as_diverged(comfy, base, session_dir, images, tmp_path):
    """The default save precision (fp16): weights that grow past fp16's range are the run diverging. It stops
    with TrainingDiverged and the learning-rate advice (not 'overflow in fp16, save in fp32'), and keeps the
    last good checkpoint, which loads."""
    model, clip, vae = base
    out = tmp_path / "diverge16.safetensors"
    # lr 1e30: the weights leave fp16's range at the first step, while the loss is still finite
    config = cfg(session_dir, steps=8, lr=1e30, save_every=1)
    assert config.save_precision == "fp16"  # the default is what this test is about
    with pytest.raises(TrainingDiverged) as err:
        train(model, clip, vae, images, config, out)
    msg = str(err.value)
    assert "Lower the learning rate" in msg and "fp16" in msg and "diverging" in msg, msg
    assert "at step 1" in msg or "by step 1" in msg, msg
    assert "No checkpoint had been saved yet" in msg and not out.exists()  # nothing diverged was written
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_train_node_takes_save_precision_as_an_appended_input(comfy, base, input_folder):
    """The advice can be taken on the node: a save_precision input, appended after every earlier input (saved
    workflows keep their widget positions; only the DiT inputs and base_precision came after it), fp16 by default; fp32 writes fp32
    weights."""
    node = comfy.node("InDomainTrainDomainUNet")
    schema = node.GET_SCHEMA()
    ids = [i.id for i in schema.inputs]
    last = schema.inputs[ids.index("save_precision")]
    assert ids[-6:] == ["overwrite", "save_precision", "empty_prompt", "latents", "timestep_sampling",
                        "base_precision"]
    assert last.default == "fp16" and list(last.options) == ["fp16", "fp32"] and last.tooltip
    name, folder = input_folder
    make_image_folder(folder, 2, 64, seed=23, nested=False)
    save = f"prec_{uuid.uuid4().hex[:6]}"
    with torch.inference_mode():
        out = node.execute(*base, name, 1, 1e-4, 1, 64, save, overwrite=True, save_precision="fp32")
    import folder_paths

    path = Path(folder_paths.get_folder_paths("domain_unets")[0]) / out.result[1]
    assert _dtypes(path) == {"F32"}
    with torch.inference_mode():
        node.execute(*base, name, 1, 1e-4, 1, 64, save, overwrite=True)
    assert _dtypes(path) == {"F16"}


# ----------------------------------------------------------------------------- item 5: LoRA previews


def test_lora_previews_copy_only_the_adapter(comfy, base, session_dir, images, tmp_path, monkeypatch):
    """Every copy of the EMA state the run makes (previews included) holds the adapter and constants only,
    never the frozen base's weights (about 10 GB per preview on SDXL before)."""
    from indomain.training.optim import EMA

    copied = []
    original = EMA.state_dict

    def counting(self, module, keeps_key=None):
        out = original(self, module, keeps_key)
        copied.append(sum(v.numel() * v.element_size() for v in out.values()))
        return out

    monkeypatch.setattr(EMA, "state_dict", counting)
    model, clip, vae = base
    result = train(model, clip, vae, images, cfg(session_dir, steps=2, lr=1e-3, form="lora", lora_rank=4,
                                                 preview_every=1, preview_steps=1, save_precision="fp32"),
                   tmp_path / "previewed.safetensors")
    assert len(result.preview_paths) == 2  # a preview after each step
    adapter_bytes = sum(v.numel() * 4 for k, v in result.state_dict.items() if not k.endswith(".alpha"))
    base_bytes = sum(v.numel() * 4 for v in model.model.diffusion_model.state_dict().values())
    assert len(copied) >= 4  # 2 previews, the save, the result
    assert max(copied) <= adapter_bytes, (max(copied), adapter_bytes, base_bytes)
    assert adapter_bytes < base_bytes / 5


# ----------------------------------------------------------------------------- item 7: LoRA resume checks the base


def _with_core_lora(model):
    """The base with a real core LoRA applied (comfy.sd.load_lora_for_models), on one attention weight."""
    import importlib

    core_lora, core_sd = importlib.import_module("comfy.lora"), importlib.import_module("comfy.sd")

    key_map = core_lora.model_lora_keys_unet(model.model, {})
    sd = model.model.diffusion_model.state_dict()
    lora_key, model_key = next((lk, mk) for lk, mk in key_map.items() if isinstance(mk, str)
                               and mk.endswith("attn1.to_q.weight") and lk.startswith("lora_unet_"))
    out_dim, in_dim = sd[model_key[len("diffusion_model."):]].shape
    g = torch.Generator().manual_seed(0)
    lora = {f"{lora_key}.lora_up.weight": torch.randn(out_dim, 4, generator=g),
            f"{lora_key}.lora_down.weight": torch.randn(4, in_dim, generator=g)}
    patched, _ = core_sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    assert len(patched.patches) == 1
    return patched


def test_lora_resume_refuses_another_base_or_the_base_plus_a_lora(comfy, base, session_dir, images, tmp_path):
    import importlib

    from indomain.devkit import tiny_models

    core_sd = importlib.import_module("comfy.sd")
    model, clip, vae = base
    out = tmp_path / "resumable.safetensors"
    lora_cfg = dict(lr=1e-3, form="lora", lora_rank=4)
    train(model, clip, vae, images, cfg(session_dir, steps=2, **lora_cfg), out, base_name="tiny_sd15.safetensors")
    other = core_sd.load_diffusion_model(str(tiny_models.tiny_unet_file(1)))  # another UNet, same layout
    # the message names the original base (the command line passes the checkpoint's file name)
    with pytest.raises(TrainingInputError, match=r"cannot resume: the saved run trained on tiny_sd15\.safetensors, .*"
                                                 r"Connect the original base"):
        train(other, clip, vae, images, cfg(session_dir, steps=3, **lora_cfg), out, resume=True)
    with pytest.raises(TrainingInputError, match=r"cannot resume: the saved run trained on tiny_sd15\.safetensors, "
                                                 r".*with 1 patched UNet weight"):
        train(_with_core_lora(model), clip, vae, images, cfg(session_dir, steps=3, **lora_cfg), out, resume=True,
              base_name="tiny_sd15.safetensors")
    # the original base continues
    resumed = train(model, clip, vae, images, cfg(session_dir, steps=3, **lora_cfg), out, resume=True)
    assert resumed.steps_done == 3


# ----------------------------------------------------------------------------- item 8: links out of input/


def test_train_node_reads_nothing_through_a_link_out_of_the_input_folder(comfy, base, input_folder, tmp_path):
    from indomain.nodes.train_node import TrainDomainUNet

    name, folder = input_folder
    make_image_folder(folder, 2, 64, seed=24, nested=False)
    elsewhere = make_image_folder(tmp_path / "elsewhere", 3, 64, seed=25, nested=False)
    (folder / "sub").symlink_to(elsewhere, target_is_directory=True)  # input/dom/sub -> /elsewhere
    outside_file = sorted(p for p in elsewhere.iterdir() if p.suffix == ".png")[0]
    (folder / "linked.png").symlink_to(outside_file)  # a file link out too
    inside = folder / "inside_link"
    inside.symlink_to(folder.parent / name / "sub2", target_is_directory=True)  # a link that stays inside: fine
    make_image_folder(folder / "sub2", 1, 64, seed=26, nested=False)

    before = TrainDomainUNet.fingerprint_inputs(image_folder=name)
    outside_file.write_bytes(outside_file.read_bytes())  # a change out there is nothing to this node
    import os

    os.utime(outside_file, ns=(1, 1))
    assert TrainDomainUNet.fingerprint_inputs(image_folder=name) == before

    node = comfy.node("InDomainTrainDomainUNet")
    save = f"links_{uuid.uuid4().hex[:6]}"
    with torch.inference_mode():
        out = node.execute(*base, name, 1, 1e-4, 1, 64, save, overwrite=True)
    import folder_paths

    _, meta = read_domain_checkpoint(Path(folder_paths.get_folder_paths("domain_unets")[0]) / out.result[1])
    # its own 2 + sub2's 1 (reached directly and through the inside link, the real folder once)
    assert meta.training["images"] == 3, meta.training
    assert meta.training["skipped"] == 2  # the folder link and the file link, reported, not read


# ----------------------------------------------------------------------------- item 11: each form's learning rate


def test_each_form_trains_at_its_own_default_learning_rate(comfy, base, session_dir, images, tmp_path, input_folder):
    from indomain.training.__main__ import build_parser, config_from_args

    model, clip, vae = base
    # the command line without --lr
    args = build_parser().parse_args(["--base", "x.safetensors", "--images", str(images), "--out", "o", "--form", "lora",
                                      "--rank", "4", "--steps", "1", "--batch-size", "2", "--resolution", "64",
                                      "--save-every", "0", "--cache-dir", str(session_dir / "latent_cache")])
    lora_run = train(model, clip, vae, images, config_from_args(args), tmp_path / "cli_lora.safetensors")
    assert 1e-4 <= lora_run.meta.training["lr"] <= 1e-3
    full_run = train(model, clip, vae, images, cfg(session_dir, steps=1), tmp_path / "full.safetensors")
    assert full_run.meta.training["lr"] == 1e-5  # the full form keeps the paper's rate
    # the node at its learning_rate widget's default
    node = comfy.node("InDomainTrainDomainUNet")
    default_lr = next(i for i in node.GET_SCHEMA().inputs if i.id == "learning_rate").default
    name, folder = input_folder
    make_image_folder(folder, 2, 64, seed=27, nested=False)
    import folder_paths

    domain_dir = Path(folder_paths.get_folder_paths("domain_unets")[0])
    for form, low, high in (("lora", 1e-4, 1e-3), ("full", 1e-5, 1e-5)):
        with torch.inference_mode():
            out = node.execute(*base, name, 1, default_lr, 1, 64, f"lr_{form}_{uuid.uuid4().hex[:6]}", form=form,
                               rank=4, overwrite=True)
        _, meta = read_domain_checkpoint(domain_dir / out.result[1])
        assert low <= meta.training["lr"] <= high, (form, meta.training["lr"])
    # the shipped LoRA training workflow leaves the rate to the form, the full one too
    from indomain.devkit import workflows as specs

    for wf_name in ("indomain_9_train_lora_and_sample", "indomain_6_train_and_sample"):
        api = json.loads((specs.API_DIR / f"{wf_name}.json").read_text())
        inputs = next(n["inputs"] for n in api.values() if n["class_type"] == "InDomainTrainDomainUNet")
        assert inputs["learning_rate"] == default_lr, wf_name


# ----------------------------------------------------------------------------- Extract Domain LoRA


def test_extract_uses_the_bases_own_weights_whatever_is_loaded(comfy, base, domain_file):
    """A clone of the base loaded with a weight patch (a LoRA) patches the shared module's weights in place;
    Extract on the base gives the same file as with nothing loaded."""
    import importlib

    from indomain.forms.model import unload_model

    mm = importlib.import_module("comfy.model_management")  # `import comfy...` would shadow the fixture
    model, _, _ = base
    node = comfy.node("InDomainExtractDomainLoRA")
    import folder_paths

    domain_dir = Path(folder_paths.get_folder_paths("domain_unets")[0])
    unload_model(model)
    clean = node.execute(model, domain_file.name, 4, "", f"ex_clean_{uuid.uuid4().hex[:6]}")
    patched = _with_core_lora(model)
    mm.load_models_gpu([patched], force_full_load=True)
    try:
        key = next(k for k in patched.patches)
        live = model.model.diffusion_model.state_dict()[key[len("diffusion_model."):]]
        assert not torch.equal(live, patched.backup[key].weight)  # the shared weights carry the LoRA now
        loaded = node.execute(model, domain_file.name, 4, "", f"ex_loaded_{uuid.uuid4().hex[:6]}")
    finally:
        unload_model(model)
    a, _ = read_domain_checkpoint(domain_dir / json.loads(clean.result[0])["output"])
    b, _ = read_domain_checkpoint(domain_dir / json.loads(loaded.result[0])["output"])
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst == 0.0, worst


HOLD_LOCK = """
import sys, time
from indomain.training.lock import OutputLock
OutputLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_extract_writes_under_the_training_lock(comfy, base, domain_file):
    import folder_paths

    model, _, _ = base
    save = f"ex_locked_{uuid.uuid4().hex[:6]}"
    out = Path(folder_paths.get_folder_paths("domain_unets")[0]) / f"{save}.safetensors"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        # ValueError: the node's package is ComfyUI's import of the pack, its TrainingInputError another class object
        with pytest.raises(ValueError, match=f"another training run is writing {save}.safetensors"):
            comfy.node("InDomainExtractDomainLoRA").execute(model, domain_file.name, 4, "", save)
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
