"""What the Train node may read and write on the ComfyUI machine.

ComfyUI servers are often shared on a LAN, so a node must not read any folder the server process
can read. Like core's dataset nodes (comfy_extras/nodes_dataset.py), training images come from a
subfolder of ComfyUI's `input/` folder, resolved (symlinks included) and checked to stay inside;
so is every folder and file the scan finds in it (`image_root`: a link `input/dom/sub -> /elsewhere`
is not followed, and is reported as skipped).
Absolute paths are accepted only when the server owner sets ALLOW_ABSOLUTE_ENV=1. The command-line
trainer is not a server and keeps free paths.
"""
from __future__ import annotations

import ntpath
import os
from pathlib import Path

import folder_paths

ALLOW_ABSOLUTE_ENV = "INDOMAIN_ALLOW_ABSOLUTE_IMAGE_FOLDERS"


def absolute_folders_allowed() -> bool:
    return os.environ.get(ALLOW_ABSOLUTE_ENV, "").strip().lower() in ("1", "true", "yes")


def input_subfolders() -> list[str]:
    """Subfolders of ComfyUI's input folder (relative, '/'-separated): the choices the node offers."""
    return folder_paths.get_input_subfolders()


def _looks_absolute(name: str) -> bool:
    # POSIX absolute, Windows absolute, drive-relative ('C:x') or UNC: none is a name inside input/
    return os.path.isabs(name) or ntpath.isabs(name) or bool(ntpath.splitdrive(name)[0]) or name.startswith("~")


def _choices_hint() -> str:
    names = input_subfolders()
    if not names:
        return "there is none yet: create one (e.g. input/my_domain) and put the images in it"
    shown = ", ".join(repr(n) for n in names[:20])
    return f"available: {shown}" + (f" (and {len(names) - 20} more)" if len(names) > 20 else "")


def resolve_image_folder(name) -> Path:
    """The real path of the training image folder `name`; raises TrainingInputError naming the fix."""
    from ..training.data import TrainingInputError

    raw = str(name if name is not None else "").strip()
    input_dir = os.path.realpath(folder_paths.get_input_directory())
    if not raw:
        raise TrainingInputError(f"image_folder is empty: put the domain images in a subfolder of ComfyUI's input "
                                 f"folder ({input_dir}) and choose it ({_choices_hint()}).")
    if "\x00" in raw:
        raise TrainingInputError("image_folder contains a NUL character; choose a subfolder of ComfyUI's input folder.")
    if _looks_absolute(raw):
        if absolute_folders_allowed():
            return Path(raw).expanduser()
        raise TrainingInputError(
            f"image_folder {raw[:200]!r} is a path outside ComfyUI's input folder; this server reads training images only "
            f"from subfolders of {input_dir} ({_choices_hint()}). Copy the images into a subfolder there, or — if you "
            f"run this server yourself — start it with {ALLOW_ABSOLUTE_ENV}=1 to allow absolute paths.")
    target = os.path.realpath(os.path.join(input_dir, raw.replace("\\", "/")))
    try:
        inside = os.path.commonpath((input_dir, target)) == input_dir
    except ValueError:  # different drives on Windows
        inside = False
    if not inside or target == input_dir:
        raise TrainingInputError(
            f"image_folder {raw[:200]!r} resolves outside the subfolders of ComfyUI's input folder ({input_dir}); "
            f"choose one of them ({_choices_hint()}).")
    if not os.path.isdir(target):  # os.path: False (not an exception) for names too long for the file system
        raise TrainingInputError(f"image_folder {raw[:200]!r} is not a folder in ComfyUI's input folder ({input_dir}); "
                                 f"choose one of them ({_choices_hint()}), or create it and put the images in it.")
    return Path(target)


def image_root(name) -> str | None:
    """The folder every training image read for `name` must resolve into: ComfyUI's input folder, or None
    (no limit) for an absolute path the server owner allowed with ALLOW_ABSOLUTE_ENV."""
    raw = str(name if name is not None else "").strip()
    if _looks_absolute(raw) and absolute_folders_allowed():
        return None
    return os.path.realpath(folder_paths.get_input_directory())


def check_save_name(save_name: str) -> str:
    """The save name with '/' separators; refuses names that could leave models/domain_unets."""
    from ..training.data import TrainingInputError

    name = str(save_name).strip().replace("\\", "/")
    if not name:
        raise TrainingInputError("save_name is empty; give a file name such as 'my_domain'.")
    parts = Path(name).parts
    # ':' covers Windows drive-relative names ('C:x' = the current folder of drive C) and NTFS streams ('a:b')
    if Path(name).is_absolute() or ntpath.isabs(name) or ":" in name or ".." in parts or "\x00" in name:
        raise TrainingInputError(f"save_name {save_name!r} must stay inside models/domain_unets (no absolute paths, "
                                 "drive letters, ':' or '..'); use a plain name or a subfolder like 'faces/v1'.")
    return name
