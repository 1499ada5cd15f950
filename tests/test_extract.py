"""Extract Domain LoRA (command line): SVD of a full-form domain UNet's difference from its base."""
from __future__ import annotations

import json

import pytest
import torch

from indomain.guidance.checkpoint import read_domain_checkpoint
from indomain.guidance.lora import DomainLoRA, merge_into
from indomain.training.extract import base_unet_state, main


def test_extract_cli_reports_error_per_rank_and_full_rank_is_exact(domain_file, tiny_files, tmp_path, capsys):
    out = tmp_path / "small.safetensors"
    rc = main(["--base", str(tiny_files["checkpoint"]), "--domain", str(domain_file), "--rank", "8",
               "--report-ranks", "2,32,1280", "--out", str(out)])
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    err = {int(r): e for r, e in report["relative_error"].items()}
    assert err[2] > err[8] > err[32] > err[1280] and err[1280] < 1e-4 and err[2] < 1.0
    assert report["bytes"]["lora"] < report["bytes"]["full"] / 5
    sd, meta = read_domain_checkpoint(out)
    assert getattr(meta, "form", "lora") == "lora" and meta.training["extracted"]["rank"] == 8
    lora = DomainLoRA.from_state_dict(sd, out.name)
    assert lora.rank == 8 and len(lora.layers) == report["layers"]

    # independent: base + adapter equals the base plus each layer's own rank-8 SVD truncation
    base = base_unet_state(tiny_files["checkpoint"])
    dom, _ = read_domain_checkpoint(domain_file)
    merged = merge_into({k: v for k, v in base.items() if k in dom}, lora)
    for name in ["input_blocks.0.0", "time_embed.2", "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj"]:
        diff = (dom[f"{name}.weight"].float() - base[f"{name}.weight"].float())
        u, s, vh = torch.linalg.svd(diff.flatten(1), full_matrices=False)
        ref = base[f"{name}.weight"].float() + ((u[:, :8] * s[:8]) @ vh[:8]).reshape(diff.shape)
        torch.testing.assert_close(merged[f"{name}.weight"], ref, rtol=0, atol=1e-3)  # adapter stored in fp16
        assert (merged[f"{name}.weight"] - dom[f"{name}.weight"].float()).abs().max() > 1e-3  # rank 8 is not exact


def test_extract_refuses_a_mismatched_base_and_its_own_output(domain_file, tmp_path, capsys):
    from indomain.devkit import tiny_models

    other = tmp_path / "other_base.safetensors"
    import safetensors.torch

    sd = tiny_models.tiny_unet_state_dict(0, dict(tiny_models.SD15_TINY_UNET, context_dim=1024, num_heads=-1,
                                                   num_head_channels=64, use_linear_in_transformer=True))
    safetensors.torch.save_file({f"model.diffusion_model.{k}": v for k, v in sd.items()}, str(other))
    assert main(["--base", str(other), "--domain", str(domain_file), "--out", str(tmp_path / "x")]) == 2
    assert "another UNet layout" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
    assert main(["--base", str(other), "--domain", str(domain_file), "--out", str(domain_file)]) == 2
    assert "overwrite" in capsys.readouterr().err


def test_extract_node_writes_a_lora_file_that_samples(comfy, domain_file, models_dir):
    """The node in a real graph: base MODEL + the full-form file -> a LoRA-form file in models/domain_unets
    that Load Domain UNet reads as the LoRA form and Domain KSampler samples with."""
    from indomain.devkit.graphs import sample_with_domain
    from indomain.forms import domain_info

    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
             "2": {"class_type": "InDomainExtractDomainLoRA", "inputs": {
                 "model": ["1", 0], "domain_unet_name": domain_file.name, "rank": 4, "report_ranks": "1,16",
                 "save_name": "extracted_r4"}}}
    report = json.loads(comfy.run(graph, outputs=["2"]).output("2"))
    assert report["output"] == "extracted_r4.safetensors" and report["rank"] == 4
    assert report["relative_error"]["1"] > report["relative_error"]["4"] > report["relative_error"]["16"]
    out = models_dir / "domain_unets" / "extracted_r4.safetensors"
    _, meta = read_domain_checkpoint(out)
    assert meta.form == "lora"
    run = comfy.run(sample_with_domain("tiny_sd15.safetensors", {"class_type": "InDomainLoadDomainUNet", "inputs": {
        "model": ["1", 0], "domain_unet_name": out.name}}, steps=2), outputs=["2", "6"])
    assert domain_info(run.output("2")).form.name == "lora"
    assert torch.isfinite(run.output("6")["samples"]).all()
