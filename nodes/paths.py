"""Where the nodes may read and write: ComfyUI's model folders and output folder, through `folder_paths`.

Every name a node receives is checked twice: it must be one that `folder_paths` lists for that folder, and its
absolute path must lie inside one of that folder's configured directories. A crafted API prompt therefore cannot
read `../../etc/passwd` or write outside the output/model folders.

Symbolic links, the same rule as ComfyUI's own loaders: a link that the administrator placed inside a model folder
is followed for reading (where it lies is what is checked, on normalized paths, never resolved through `..`), and
what it points to must be a regular file. Writing never follows a link out of its folder: the directory a file is
saved into is checked after resolving every link, against the resolved destination folder.
"""
from __future__ import annotations

import os
import stat

import folder_paths

SOURCE_FOLDERS = ("diffusion_models", "checkpoints", "text_encoders", "loras")
CALIBRATION_FOLDERS = ("quant_calibration",)  # models/quant_calibration: docs/CALIBRATION.md statistics files
LORA_FOLDERS = ("loras",)
SAVE_DESTINATIONS = ("output", "diffusion_models", "checkpoints", "text_encoders")
VERIFY_FOLDERS = ("output", "diffusion_models", "checkpoints", "text_encoders")
SUFFIX = ".safetensors"


def register_calibration_folder() -> None:
    """models/quant_calibration, for calibration statistics files (extra_model_paths.yaml may add more)."""
    if "quant_calibration" not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path("quant_calibration", os.path.join(folder_paths.models_dir, "quant_calibration"))


register_calibration_folder()


def list_files(folders: tuple[str, ...]) -> list[str]:
    """`folder/relative/name.safetensors` for every safetensors file ComfyUI lists in those folders."""
    names = []
    for folder in folders:
        names += [f"{folder}/{name}" for name in _folder_listing(folder) if name.lower().endswith(SUFFIX)]
    return sorted(names)


def resolve(name: str, folders: tuple[str, ...]) -> str:
    """Absolute path of a listed `folder/name`; ValueError (one line) for anything else."""
    folder, _, relative = name.partition("/")
    if folder not in folders or not relative:
        raise ValueError(f"{name!r}: expected one of the listed files (folders: {', '.join(folders)})")
    if relative not in _folder_listing(folder):
        raise ValueError(f"{name!r}: no such file in ComfyUI's {folder} folder (refresh the node list?)")
    for base in _directories(folder):
        path = os.path.abspath(os.path.join(base, relative))
        if _inside(path, base) and os.path.lexists(path):
            return _regular_target(path, name)
    raise ValueError(f"{name!r}: not inside ComfyUI's {folder} folder")


def _regular_target(path: str, name: str) -> str:
    """The resolved path of a listed file (a link placed in the folder is followed); it must be a regular file."""
    target = os.path.realpath(path)
    try:
        mode = os.stat(target).st_mode
    except OSError:
        raise ValueError(f"{name!r}: a link to a missing file") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"{name!r}: not a regular file (a FIFO, device or directory cannot be read as a model)")
    return target


def confine(path: str, folders: tuple[str, ...]) -> str:
    """An absolute path (e.g. from Save Quantized's output) checked to lie inside one of the folders."""
    path = os.path.abspath(path)
    for folder in folders:
        if any(_inside(path, base) for base in _directories(folder)) and os.path.lexists(path):
            return _regular_target(path, path)
    raise ValueError(f"{path}: not a file inside ComfyUI's {', '.join(folders)} folders")


def display_name(path: str, folders: tuple[str, ...]) -> str:
    """`folder/relative` for an absolute path inside one of the folders (else the file name)."""
    for folder in folders:
        for base in _directories(folder):
            if _inside(path, base):
                return f"{folder}/" + os.path.relpath(path, base).replace(os.sep, "/")
    return os.path.basename(path)


def save_path(filename_prefix: str, destination: str) -> tuple[str, str]:
    """(absolute path, display name) of a new, numbered file for `filename_prefix` in `destination`."""
    if destination not in SAVE_DESTINATIONS:
        raise ValueError(f"destination {destination!r}: choose from {', '.join(SAVE_DESTINATIONS)}")
    base = _save_directory(destination)
    try:
        directory, filename, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, base)
    except Exception as e:  # ComfyUI raises a bare Exception for prefixes that leave the folder
        raise ValueError(f"filename_prefix {filename_prefix!r}: {str(e).strip('* ')}") from None
    if not _inside(os.path.abspath(directory), base) or \
            not _inside(os.path.realpath(directory), os.path.realpath(base)):
        raise ValueError(f"filename_prefix {filename_prefix!r} leaves the {destination} folder (directly or "
                         "through a symbolic link)")
    os.makedirs(directory, exist_ok=True)
    name = f"{filename}_{counter:05}_{SUFFIX}"
    return os.path.join(directory, name), "/".join(p for p in (destination, subfolder, name) if p)


def _save_directory(folder: str) -> str:
    """The folder's own directory (models/diffusion_models rather than the legacy models/unet listed first)."""
    directories = _directories(folder)
    return next((d for d in directories if os.path.basename(d) == folder), directories[0])


def _folder_listing(folder: str) -> list[str]:
    if folder == "output":
        base = folder_paths.get_output_directory()
        return [os.path.relpath(os.path.join(root, f), base).replace(os.sep, "/")
                for root, _, files in os.walk(base, followlinks=True) for f in files]
    return folder_paths.get_filename_list(folder)


def _directories(folder: str) -> list[str]:
    if folder == "output":
        return [os.path.abspath(folder_paths.get_output_directory())]
    return [os.path.abspath(d) for d in folder_paths.get_folder_paths(folder)]


def _inside(path: str, base: str) -> bool:
    try:
        return os.path.commonpath([path, base]) == base
    except ValueError:  # different drives on Windows
        return False
