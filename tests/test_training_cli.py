"""The training command line as users run it: a subprocess with the real ComfyUI, Ctrl-C that saves and
exits cleanly, --resume, and two data-parallel processes under torchrun (gloo on CPU)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from indomain.devkit.images import make_image_folder
from indomain.guidance.checkpoint import read_domain_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images(session_dir):
    folder = session_dir / "cli_images"
    if not folder.exists():
        make_image_folder(folder, 6, 64, seed=9)
    return folder


def cli(tiny_files, images, out, cache, *extra):
    return ["-m", "indomain.training", "--base", str(tiny_files["checkpoint"]), "--images", str(images),
            "--out", str(out), "--resolution", "64", "--batch-size", "2", "--lr", "1e-4", "--cache-dir", str(cache),
            "--cpu", *extra]


def env():
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return e


def test_ctrl_c_saves_and_exits_cleanly_then_resume_finishes(tiny_files, images, tmp_path):
    out = tmp_path / "cli" / "dom.safetensors"
    log = open(tmp_path / "cli.log", "w+")
    proc = subprocess.Popen([sys.executable, *cli(tiny_files, images, out, tmp_path / "cache", "--steps", "500",
                                                 "--save-every", "0")],
                            stdout=log, stderr=subprocess.STDOUT, env=env())
    try:
        deadline = time.time() + 400
        while time.time() < deadline:  # wait until the progress bar shows a finished step
            text = (tmp_path / "cli.log").read_text(errors="replace")
            if "loss=" in text or proc.poll() is not None:
                break
            time.sleep(0.5)
        assert proc.poll() is None, text[-3000:]
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = (tmp_path / "cli.log").read_text(errors="replace")
    assert rc == 130, text[-3000:]
    assert "interrupted:" in text and "Traceback" not in text
    _, meta = read_domain_checkpoint(out)
    done = meta.training["steps"]
    assert 1 <= done < 500
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".partial")]

    r = subprocess.run([sys.executable, *cli(tiny_files, images, out, tmp_path / "cache", "--steps", str(done + 2),
                                             "--resume", "--summary-json", str(tmp_path / "s.json"))],
                       capture_output=True, text=True, env=env(), timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "done:" in r.stdout and "saved" in r.stdout
    _, meta = read_domain_checkpoint(out)
    assert meta.training["steps"] == done + 2
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["steps_done"] == done + 2 and summary["latent_cache_hits"] == 6


def test_torchrun_two_processes_gloo_identical_weights_one_file(tiny_files, images, tmp_path):
    out_dir = tmp_path / "ddp"
    summary = tmp_path / "ddp.json"
    # torchrun's module form: the torchrun script lives in the venv that installed torch, not in an overlay venv
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
                        *cli(tiny_files, images, out_dir / "ddp.safetensors", tmp_path / "cache", "--steps", "3",
                             "--save-every", "2", "--summary-json", str(summary))],
                       capture_output=True, text=True, env=env(), timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    s = json.loads(summary.read_text())
    assert s["world_size"] == 2 and s["effective_batch"] == 4 and s["steps_done"] == 3
    digests = s["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1], digests
    written = sorted(p.name for p in out_dir.iterdir())
    # one model file (plus its resume state and loss curve): rank 1 wrote nothing
    assert written == ["ddp.loss.png", "ddp.resume", "ddp.safetensors"], written
    _, meta = read_domain_checkpoint(out_dir / "ddp.safetensors")
    assert meta.training["world_size"] == 2 and meta.training["steps"] == 3


def _free_port() -> int:
    from indomain.devkit.host import free_port

    return free_port()


def _only_the_site_and_stubs(site) -> str:
    """PYTHONPATH for the installed-pack probe: the copied pack, plus the test-only torchaudio stand-in when this run
    uses it (ComfyUI 0.33 imports torchaudio at start-up; scripts/host_env.sh puts tests/stubs first on the path)."""
    stubs = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p.endswith(os.path.join("tests", "stubs"))]
    return os.pathsep.join([str(site), *stubs])


def test_cli_runs_from_an_installed_pack_without_the_devkit(tiny_files, images, tmp_path):
    """The shipped files alone (no devkit/, tests/, bench/, demo/) train from the command line."""
    import shutil

    from indomain.pack import PACK_ROOT, comfyui_dir

    site = tmp_path / "site"
    shutil.copytree(PACK_ROOT, site / "indomain", symlinks=True, ignore=shutil.ignore_patterns(
        "devkit", "tests", "bench", "demo", ".venv", ".host", ".cache", ".git", "artifacts", "__pycache__"))
    assert not (site / "indomain" / "devkit").exists()
    out = tmp_path / "installed" / "dom.safetensors"
    probe = ("import runpy, sys, indomain; assert indomain.__file__.startswith(sys.argv[1]), indomain.__file__; "
             "sys.argv = ['indomain.training'] + sys.argv[2:]; runpy.run_module('indomain.training', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", probe, str(site), *cli(tiny_files, images, out, tmp_path / "cache",
                                                                     "--steps", "1")[2:]],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path,
                       env=dict(env(), PYTHONPATH=_only_the_site_and_stubs(site), COMFYUI_DIR=str(comfyui_dir())))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    _, meta = read_domain_checkpoint(out)
    assert meta.training["steps"] == 1
