"""Issue 13, writers: two runs on one save name (a lock, stale after kill -9), a reader during saves never
sees a torn file, and the command-line trainer killed with SIGKILL resumes to the same weights as an
uninterrupted run (at most one checkpoint interval lost, no temp or lock files left)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from indomain.devkit.images import make_image_folder
from indomain.guidance.checkpoint import DomainMeta, read_domain_checkpoint, write_domain_checkpoint
from indomain.training.data import TrainingInputError
from indomain.training.lock import OutputLock, lock_path_for
from indomain.training.resume import read_resume_state
from indomain.training.trainer import TrainConfig, resume_path_for, train

HOLD_LOCK = """
import sys, time
from indomain.training.lock import OutputLock
OutputLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def _holder(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_is_refused_and_a_killed_writers_lock_is_stale(tmp_path, caplog):
    folder = make_image_folder(tmp_path / "imgs", 2, 64, nested=False)
    out = tmp_path / "models" / "shared.safetensors"
    holder = _holder(out)
    try:
        config = TrainConfig(steps=1, batch_size=1, resolution=64, cache_dir=str(tmp_path / "cache"))
        with pytest.raises(TrainingInputError, match=rf"another training run is writing shared.safetensors "
                                                      rf"\(pid {holder.pid} .*choose another save name"):
            train(None, None, None, folder, config, out)  # refused before any model is touched
        assert lock_path_for(out).is_file() and not out.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock_path_for(out).is_file()  # SIGKILL leaves the lock behind ...
    with caplog.at_level("WARNING", logger="indomain.training"):
        lock = OutputLock(out).acquire()  # ... and the next run takes it over, saying so
    try:
        assert json.loads(lock_path_for(out).read_text())["pid"] == os.getpid()
        assert any("stale lock" in r.getMessage() for r in caplog.records)
    finally:
        lock.release()
    assert not lock_path_for(out).exists()


def test_a_lock_file_left_by_a_crashed_run_on_another_host_is_taken(tmp_path):
    """Issue 22 (6): the lock is the kernel's, not a guess from the pid and host in the file. A lock file whose
    writer is gone (here: one from another machine sharing the folder, which crashed) holds no lock: taken."""
    out = tmp_path / "remote.safetensors"
    lock_path_for(out).write_text(json.dumps({"pid": 1, "host": "some-other-machine", "started": "x"}))
    lock = OutputLock(out).acquire()
    try:
        assert json.loads(lock_path_for(out).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not lock_path_for(out).exists()


RACE = """
import os, sys, time
from indomain.training.lock import OutputLock
out, ctl, me, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
print("ready", flush=True)
for k in range(rounds):
    go = os.path.join(ctl, f"go{k}")
    while not os.path.exists(go):
        pass
    lock = OutputLock(out)
    try:
        lock.acquire()
        held = True
    except Exception:
        held = False
    with open(os.path.join(ctl, f"r{k}.{me}.tmp"), "w") as f:
        f.write("held" if held else "busy")
    os.replace(os.path.join(ctl, f"r{k}.{me}.tmp"), os.path.join(ctl, f"r{k}.{me}"))
    while not os.path.exists(os.path.join(ctl, f"done{k}")):
        time.sleep(0.001)
    if held:
        lock.release()
    open(os.path.join(ctl, f"rel{k}.{me}"), "w").close()
"""


def _wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"timed out waiting for {path.name}"
        time.sleep(0.001)


def test_two_processes_racing_for_a_stale_lock_never_both_hold_it(tmp_path):
    """Issue 22 (6): two runs breaking the same stale lock (left by a run killed with SIGKILL) at the same time:
    in every round exactly one holds it. Real processes, started together on each round's signal."""
    out = tmp_path / "raced.safetensors"
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x", "output": out.name})
    rounds = 60
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(out), str(ctl), str(i), str(rounds)],
                              stdout=subprocess.PIPE, text=True) for i in range(2)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        both = []
        for k in range(rounds):
            lock_path_for(out).write_text(stale)  # what a run killed with SIGKILL leaves behind
            (ctl / f"go{k}").touch()
            results = []
            for i in range(2):
                _wait_for(ctl / f"r{k}.{i}")
                results.append((ctl / f"r{k}.{i}").read_text())
            if results.count("held") != 1:
                both.append((k, results))
            (ctl / f"done{k}").touch()
            for i in range(2):
                _wait_for(ctl / f"rel{k}.{i}")
        assert not both, f"rounds where not exactly one process held the lock: {both}"
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_a_holder_killed_with_sigkill_releases_the_lock_at_once(tmp_path):
    """Issue 22 (6): the kernel releases the lock of a killed holder; the lock file it leaves is no obstacle,
    whatever it says, and while the holder lived, another process was refused."""
    out = tmp_path / "killed.safetensors"
    holder = _holder(out)
    try:
        probe = subprocess.run([sys.executable, "-c", "import sys\nfrom indomain.training.lock import OutputLock\n"
                                "try:\n    OutputLock(sys.argv[1]).acquire()\nexcept Exception as e:\n"
                                "    print('busy', e)\nelse:\n    print('held')", str(out)],
                               capture_output=True, text=True, timeout=120)
        assert probe.stdout.startswith("busy") and f"pid {holder.pid}" in probe.stdout, probe.stdout + probe.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock_path_for(out).is_file()
    lock = OutputLock(out).acquire()
    lock.release()


def test_remove_partials_escapes_glob_characters_in_the_name(tmp_path):
    """Issue 22 (10): a save name with '[' ('dom[1]') is matched literally, not as a glob character class."""
    from indomain.training.lock import remove_partials

    out = tmp_path / "dom[1].safetensors"
    (tmp_path / ".dom[1].AbCd1234.partial").mkdir()
    (tmp_path / ".dom[1].loss.png.Zx9Yw8Vu.partial").write_bytes(b"x")
    (tmp_path / "dom[1].previews").mkdir()
    (tmp_path / "dom[1].previews" / ".step_000002_domain.png.Qq1Ww2Ee.partial").write_bytes(b"x")
    (tmp_path / ".dom1.AbCd1234.partial").mkdir()  # another name, which the unescaped '[1]' matched
    assert len(remove_partials(out)) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [".dom1.AbCd1234.partial", "dom[1].previews"]
    assert list((tmp_path / "dom[1].previews").iterdir()) == []


def _meta(i: int) -> DomainMeta:
    return DomainMeta("SD15", "EPS", "sig", "fp", training={"version": i})


def test_a_reader_never_sees_a_torn_file_while_saves_land(tmp_path):
    """A reader polls the file while 40 saves replace it back to back. Every read must be whole and consistent
    (metadata and tensors of one save), and must return a version that was the file's content at some moment of
    the read. The test also checks what makes that mean something: many reads were in flight while a save was
    (the saves are 2 MB each, tens of milliseconds, so the reader keeps landing inside them)."""
    path = tmp_path / "live.safetensors"
    saves_n = 40

    def tensors(i):
        return {"b.attn2.constant": torch.full((64,), float(i + 1)), "w": torch.full((1024, 1024), float(i + 1))}

    write_domain_checkpoint(path, tensors(0), _meta(0))
    done = threading.Event()
    errors, saves, reads = [], [], []  # saves[i - 1] = (start, end) of the save of version i; reads: (start, end, v)

    def writer():
        try:
            for i in range(1, saves_n + 1):
                started = time.perf_counter()
                write_domain_checkpoint(path, tensors(i), _meta(i))
                saves.append((started, time.perf_counter()))
        except Exception as e:  # reported below
            errors.append(e)
        finally:
            done.set()

    t = threading.Thread(target=writer)
    t.start()
    try:
        while not done.is_set() or len(reads) < 5:
            started = time.perf_counter()
            sd, meta = read_domain_checkpoint(path)  # raises on a torn or half-written file
            ended = time.perf_counter()
            v = meta.training["version"]
            assert float(sd["w"].min()) == float(sd["w"].max()) == float(sd["b.attn2.constant"][0]) == v + 1
            reads.append((started, ended, v))
    finally:
        t.join()
    assert not errors and len(saves) == saves_n, errors
    overlapping = 0
    for r_start, r_end, v in reads:
        landed_before = sum(1 for _, s_end in saves if s_end <= r_start)  # saves whose rename was done when it began
        begun_before_end = sum(1 for s_start, _ in saves if s_start < r_end)  # saves that had begun when it ended
        assert landed_before <= v <= begun_before_end, (r_start, r_end, v, landed_before, begun_before_end)
        overlapping += any(r_start < s_end and r_end > s_start for s_start, s_end in saves)
    assert overlapping >= 20, f"only {overlapping} of {len(reads)} reads overlapped a save: the test proved nothing"
    assert len({v for _, _, v in reads}) >= 5  # the reader saw the file change under it, many times
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".partial"]


# ----------------------------------------------------------------------------- kill -9 the command-line trainer


def _cli(tiny_files, images, out, cache, *extra):
    return [sys.executable, "-m", "indomain.training", "--base", str(tiny_files["checkpoint"]), "--images", str(images),
            "--out", str(out), "--resolution", "64", "--batch-size", "2", "--lr", "1e-4", "--cache-dir", str(cache),
            "--cpu", "--seed", "4", "--save-every", "2", *extra]


def _env():
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


@pytest.mark.slow
def test_kill_9_during_training_then_resume_equals_an_uninterrupted_run(tiny_files, tmp_path):
    images = make_image_folder(tmp_path / "imgs", 4, 64, seed=12, nested=False)
    cache = tmp_path / "cache"
    killed_dir, straight_dir = tmp_path / "killed", tmp_path / "straight"
    out = killed_dir / "dom.safetensors"
    log_path = tmp_path / "killed.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(_cli(tiny_files, images, out, cache, "--steps", "1000"), stdout=log,
                                stderr=subprocess.STDOUT, env=_env())
        try:
            deadline = time.time() + 500
            while time.time() < deadline and proc.poll() is None:
                if resume_path_for(out).is_file():  # the first periodic checkpoint (step 2) has landed
                    break
                time.sleep(0.2)
            assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
            # a second writer on the same name is refused while the first runs
            second = subprocess.run(_cli(tiny_files, images, out, cache, "--steps", "3"), capture_output=True,
                                    text=True, env=_env(), timeout=300)
            assert second.returncode == 2, second.stderr[-2000:]
            assert "another training run is writing dom.safetensors" in second.stderr and "Traceback" not in second.stderr
            time.sleep(1.0)
            text = log_path.read_text(errors="replace")
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # the step the killed run had reached, from its progress bar (tqdm "N/1000")
    reached = max(int(n) for n in re.findall(r"(\d+)/1000", text))
    # defect 8: the trainer's own information lines are shown by the CLI
    assert re.search(r"InDomain training: 4 images \(\d+ from cache, 0 skipped\)", text), text[-3000:]
    assert lock_path_for(out).is_file()  # left behind by SIGKILL
    _, info = read_resume_state(resume_path_for(out))
    saved_step = info["step"]
    assert saved_step % 2 == 0 and saved_step >= 2
    assert reached - saved_step <= 2, (reached, saved_step)  # at most one checkpoint interval lost

    # what a kill in the middle of a save leaves: our temp folder with safetensors' own temp file inside
    torn = killed_dir / ".dom.AbCd1234.partial"
    torn.mkdir()
    (torn / ".tmpQwErTy").write_bytes(b"half a file")
    # ... and what a kill while the loss curve is written leaves (save_png_atomic's temp file)
    (killed_dir / ".dom.loss.png.Zx9Yw8Vu.partial").write_bytes(b"half a picture")
    steps = saved_step + 2  # the resumed run finishes; an uninterrupted run of the same length is the reference
    r = subprocess.run(_cli(tiny_files, images, out, cache, "--steps", str(steps), "--resume"), capture_output=True,
                       text=True, env=_env(), timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "stale lock" in r.stderr and "done:" in r.stdout and "Traceback" not in r.stderr
    s = subprocess.run(_cli(tiny_files, images, straight_dir / "dom.safetensors", cache, "--steps", str(steps)),
                       capture_output=True, text=True, env=_env(), timeout=600)
    assert s.returncode == 0, (s.stdout + s.stderr)[-3000:]
    resumed, meta = read_domain_checkpoint(out)
    straight, _ = read_domain_checkpoint(straight_dir / "dom.safetensors")
    assert meta.training["steps"] == steps
    worst = max(float((resumed[k].float() - straight[k].float()).abs().max()) for k in straight)
    assert worst <= 1e-6, worst
    leftovers = sorted(p.name for p in killed_dir.iterdir())
    # the model, its resume state and the loss curve (every save writes it, the resumed run's last save too);
    # no temp file (model's, resume state's or loss curve's), no lock
    assert leftovers == ["dom.loss.png", "dom.resume", "dom.safetensors"], leftovers


def test_remove_partials_takes_every_temp_file_a_killed_save_leaves(tmp_path):
    """A kill -9 can land in any of a save's writes: the model or resume state (temp folder), the loss curve or
    a preview (temp files of save_png_atomic). The next run on the name removes them all, and nothing else."""
    from indomain.training.lock import remove_partials

    out = tmp_path / "dom.safetensors"
    (tmp_path / ".dom.AbCd1234.partial").mkdir()
    (tmp_path / ".dom.loss.png.Zx9Yw8Vu.partial").write_bytes(b"x")
    (tmp_path / "dom.previews").mkdir()
    (tmp_path / "dom.previews" / ".step_000002_domain.png.Qq1Ww2Ee.partial").write_bytes(b"x")
    keep = ["dom.loss.png", "dom.resume", "dom.safetensors", ".other.AbCd1234.partial", "other.loss.png"]
    for name in keep:
        (tmp_path / name).write_bytes(b"k")
    (tmp_path / "dom.previews" / "step_000002_domain.png").write_bytes(b"k")
    assert len(remove_partials(out)) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep + ["dom.previews"])
    assert [p.name for p in (tmp_path / "dom.previews").iterdir()] == ["step_000002_domain.png"]


def test_upper_case_suffix_is_one_rule_from_preflight_to_writer(tmp_path):
    """Defect 1: '.SAFETENSORS' passed the pre-flight checks, then the writer refused it at the first save."""
    from indomain.training.config import check_output_writable

    out = check_output_writable(tmp_path / "Upper.SAFETENSORS")  # the pre-flight accepts any case ...
    sd = {"b.attn2.constant": torch.ones(4), "w": torch.ones(2, 2)}
    write_domain_checkpoint(out, sd, _meta(0))  # ... and so does the writer now
    loaded, meta = read_domain_checkpoint(out)  # and the loader (which lists any case, like ComfyUI's folder_paths)
    assert meta.training["version"] == 0 and torch.equal(loaded["w"], sd["w"])
    with pytest.raises(Exception, match="saved as .safetensors"):
        write_domain_checkpoint(tmp_path / "x.ckpt", sd, _meta(0))


# ----------------------------------------------------------------------------- defect 7: a taken save name


def _existing_model(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_domain_checkpoint(path, {"b.attn2.constant": torch.ones(4), "w": torch.ones(2, 2)}, _meta(0))
    return path.read_bytes()


@pytest.mark.slow
def test_cli_refuses_a_fresh_run_on_a_taken_name_unless_overwrite(tiny_files, tmp_path):
    """Defect 7: the first periodic checkpoint of a fresh run replaced a finished model of the same name."""
    images = make_image_folder(tmp_path / "imgs", 2, 64, seed=13, nested=False)
    out = tmp_path / "taken" / "dom.safetensors"
    before = _existing_model(out)
    r = subprocess.run(_cli(tiny_files, images, out, tmp_path / "cache", "--steps", "2"), capture_output=True,
                       text=True, env=_env(), timeout=300)
    assert r.returncode == 2, (r.stdout + r.stderr)[-3000:]
    assert "dom.safetensors already exists" in r.stderr and "--overwrite" in r.stderr and "--resume" in r.stderr
    assert "Traceback" not in r.stderr and "InDomain training:" not in r.stdout  # refused before loading models
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["dom.safetensors"]  # no lock, no resume state left
    r = subprocess.run(_cli(tiny_files, images, out, tmp_path / "cache", "--steps", "1", "--overwrite"),
                       capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    _, meta = read_domain_checkpoint(out)
    assert meta.training["steps"] == 1 and "version" not in meta.training  # replaced by the new run


def test_train_node_refuses_a_taken_save_name_unless_overwrite(comfy, base, models_dir):
    import uuid

    import folder_paths

    node = comfy.node("InDomainTrainDomainUNet")
    schema = node.GET_SCHEMA()
    ids = [i.id for i in schema.inputs]
    last = schema.inputs[ids.index("overwrite")]
    # appended at the end in its time; only save_precision, the DiT inputs and base_precision came after it
    assert ids[-6:] == ["overwrite", "save_precision", "empty_prompt", "latents", "timestep_sampling",
                        "base_precision"] and last.default is False and "refused" in last.tooltip
    name = f"taken_{uuid.uuid4().hex[:6]}"
    out = models_dir / "domain_unets" / f"{name}.safetensors"
    before = _existing_model(out)
    folder = f"indomain_taken_{uuid.uuid4().hex[:6]}"
    make_image_folder(Path(folder_paths.get_input_directory()) / folder, 2, 64, seed=14, nested=False)
    try:
        with torch.inference_mode():
            with pytest.raises(ValueError, match=f"{name}.safetensors already exists.*overwrite"):
                node.execute(*base, folder, 1, 1e-4, 1, 64, name)
            assert out.read_bytes() == before
            assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(name)) == [out.name]
            result = node.execute(*base, folder, 1, 1e-4, 1, 64, name, overwrite=True)
        assert result.result[1] == f"{name}.safetensors"
        _, meta = read_domain_checkpoint(out)
        assert meta.training["steps"] == 1 and "version" not in meta.training
    finally:
        shutil.rmtree(Path(folder_paths.get_input_directory()) / folder, ignore_errors=True)
