"""Bad training input gives a clear message naming the fix, before any model is touched, and leaves
nothing half-written. The model arguments are None on purpose: the checks must not need them."""
from __future__ import annotations

import subprocess
import sys

import pytest

from indomain.devkit.images import add_bad_files, make_image_folder
from indomain.training.data import TrainingInputError, check_resolution, scan_images
from indomain.training.trainer import TrainConfig, check_output_writable, train


def files_under(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


def run_train(folder, out, **kw):
    config = TrainConfig(steps=2, batch_size=1, resolution=kw.pop("resolution", 64), cache_dir=str(out.parent / "cache"), **kw)
    return train(None, None, None, folder, config, out)


def test_empty_folder(tmp_path, out_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingInputError, match="no usable training image .* it is empty.*Add at least one"):
        run_train(tmp_path / "empty", out_dir / "d.safetensors")
    assert files_under(out_dir) == [] and not (tmp_path / "cache").exists()


def test_missing_folder(tmp_path, out_dir):
    with pytest.raises(TrainingInputError, match="image folder not found"):
        run_train(tmp_path / "nope", out_dir / "d.safetensors")


def test_folder_of_non_images(tmp_path, out_dir):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("hello")
    (folder / "b.csv").write_text("1,2")
    with pytest.raises(TrainingInputError, match="2 file.* none with an image extension"):
        run_train(folder, out_dir / "d.safetensors")
    # files named like images that are not images
    (folder / "fake.png").write_text("not a png")
    (folder / "fake.webp").write_bytes(b"\x00" * 100)
    with pytest.raises(TrainingInputError, match="all 2 image file.* were skipped"):
        run_train(folder, out_dir / "d.safetensors")
    assert files_under(out_dir) == []


def test_unreadable_files_mixed_with_good_ones_are_skipped_and_counted(tmp_path, caplog):
    folder = make_image_folder(tmp_path / "imgs", 5, 64, seed=1)
    bad = add_bad_files(folder)
    with caplog.at_level("WARNING", logger="indomain.training"):
        scan = scan_images(folder, 64)
    assert scan.count == 5 and sorted(p.name for p, _ in scan.skipped) == sorted(bad)
    assert len([r for r in caplog.records if "skipping" in r.getMessage()]) == 3
    # recursive, any-case extensions, captions ignored
    assert {p.suffix for p in scan.usable} >= {".png", ".jpg", ".PNG", ".webp", ".bmp"}
    assert any(p.parent.name == "more" for p in scan.usable)


@pytest.mark.parametrize("res", [60, 100, 0])
def test_resolution_not_divisible_by_eight(tmp_path, out_dir, res):
    folder = make_image_folder(tmp_path / "imgs", 2, 64)
    with pytest.raises(TrainingInputError, match="resolution"):
        run_train(folder, out_dir / "d.safetensors", resolution=res)
    assert files_under(out_dir) == []


def test_resolution_must_fit_the_model_factor():
    check_resolution(512, 64)
    with pytest.raises(TrainingInputError, match="not a multiple of 64.*Use 64 or 128"):
        check_resolution(96, 64)


def test_unwritable_output(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", 2, 64)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    before = files_under(tmp_path)
    for out in (blocker / "sub" / "d.safetensors", tmp_path / "dir.safetensors"):
        if out.name == "dir.safetensors":
            out.mkdir()
            before = files_under(tmp_path)
        with pytest.raises(TrainingInputError, match="cannot write the output|is a folder"):
            run_train(folder, out)
        assert files_under(tmp_path) == before  # no folders, temp files or cache entries left behind
    with pytest.raises(TrainingInputError, match=r"\.safetensors"):
        check_output_writable(tmp_path / "d.ckpt")


def test_bad_settings_are_named():
    with pytest.raises(TrainingInputError, match="steps must be >= 1.*lr must be a positive"):
        TrainConfig(steps=0, lr=-1.0, resolution=64).validate()


def test_cli_help_and_early_errors(tmp_path):
    py = sys.executable
    r = subprocess.run([py, "-m", "indomain.training", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--resume" in r.stdout and "torchrun" in r.stdout
    (tmp_path / "empty").mkdir()
    r = subprocess.run([py, "-m", "indomain.training", "--base", str(tmp_path / "missing.safetensors"), "--images",
                        str(tmp_path / "empty"), "--out", str(tmp_path / "o" / "d")], capture_output=True, text=True,
                       timeout=120)
    # the empty folder is reported before the (missing) checkpoint is even looked at
    assert r.returncode == 2 and "no usable training image" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "o").exists()
