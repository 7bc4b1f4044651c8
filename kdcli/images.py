"""Image folders as a data source, read with Pillow and decoded once into a cache.

Layouts:

* ``DIR/CLASS/**/*.png``: labelled, like torchvision's ``ImageFolder``. Classes are the
  sub-folder names in sorted order (class ``i`` is the ``i``-th name).
* ``DIR/*.png`` (no sub-folders with images): unlabelled.

Files ending in .png, .jpg, .jpeg, .bmp or .webp are read; other files are ignored.
Examples are ordered by file name (numbers in names compared as numbers), then by class
folder, so that files numbered across classes keep their numbering and a slice such as
``[:600]`` takes from every class.

Images become uint8 ``[N, H, W]`` when grayscale and ``[N, C, H, W]`` (channels first)
when RGB. ``--channels 1|3`` forces one; by default the folder is RGB if any image is in
colour. ``--image-size H,W`` resizes every image (bilinear); without it the images must
share one size.

The decoded array is written once to ``$KDCLI_CACHE/images/<key>/`` (default
``~/.cache/kdcli``; never inside the data folder) as ``inputs.npy`` beside a
``manifest.json`` that lists every file's name, size and modification time. A later load
whose listing matches memory-maps the array instead of decoding; any added, removed,
renamed or touched file makes it decode afresh.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcli.errors import DataError

if TYPE_CHECKING:
    import numpy as np

    from kdcli.data import DataOptions

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
CACHE_FORMAT = "kdcli.image-cache"
CACHE_VERSION = 1
_GRAY_BANDS = ({"L"}, {"L", "A"}, {"1"}, {"I"}, {"F"})


@dataclass
class ImageFolder:
    """A folder read as examples: ``inputs`` is ``(tensor, MappedFile)`` or a numpy array."""

    inputs: Any
    labels: np.ndarray | None
    class_names: list[str] | None


def cache_root() -> Path:
    """Where decoded folders are cached: ``$KDCLI_CACHE``, else ``$XDG_CACHE_HOME/kdcli``
    or ``~/.cache/kdcli``."""
    if os.environ.get("KDCLI_CACHE"):
        return Path(os.environ["KDCLI_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kdcli"


def load_image_folder(folder: Path, opts: DataOptions) -> ImageFolder:
    """Read an image folder (see the module docstring), from the cache when it is current.

    Raises:
        DataError: no images; mixed sizes without ``--image-size``; an unreadable image
            (naming the file).
    """
    import numpy as np

    files, classes = scan(folder)
    listing = [[str(p.relative_to(folder)), st.st_size, st.st_mtime_ns] for p, st, _ in files]
    labels = None if classes is None else np.array([k for _, _, k in files], dtype=np.int64)
    key = {"folder": str(folder.resolve()), "channels": opts.channels,
           "image_size": list(opts.image_size) if opts.image_size else None}
    cached = _read_cache(key, listing)
    if cached is not None:
        return ImageFolder(cached, labels, classes)
    inputs = _decode_all(folder, [p for p, _, _ in files], opts, key, listing)
    return ImageFolder(inputs, labels, classes)


def scan(folder: Path) -> tuple[list[tuple[Path, os.stat_result, int]], list[str] | None]:
    """The image files of a folder with their ``stat`` and class index, in example order,
    and the class names (None for a flat folder)."""
    subdirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    per_class = [(d.name, _images_under(d)) for d in subdirs]
    if any(found for _, found in per_class):
        classes = [name for name, _ in per_class]
        files = [(p, k) for k, (_, found) in enumerate(per_class) for p in found]
        files.sort(key=lambda pk: (_natural(pk[0].name), pk[1], _natural(str(pk[0]))))
    else:
        classes = None
        files = [(p, -1) for p in sorted(_images_in(folder), key=lambda p: _natural(p.name))]
    if not files:
        raise DataError(f"folder {folder} holds no images ({', '.join(EXTENSIONS)})",
                        "Use DIR/CLASS/*.png (labelled) or DIR/*.png (unlabelled)")
    inside = folder.resolve()
    for p, _ in files:
        if not p.resolve().is_relative_to(inside):
            raise DataError(f"image {p} links to {p.resolve()}, outside {folder}",
                            "Copy the file into the folder, or remove the link")
    return [(p, p.stat(), k) for p, k in files], classes


def _images_in(d: Path) -> list[Path]:
    return [p for p in d.iterdir()
            if p.is_file() and p.suffix.lower() in EXTENSIONS and not p.name.startswith(".")]


def _images_under(d: Path) -> list[Path]:
    return [p for p in d.rglob("*")
            if p.suffix.lower() in EXTENSIONS and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(d).parts)]


def _natural(s: str) -> list[Any]:
    """Sort key comparing runs of digits as numbers: 2.png before 10.png."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", s) if t]


def _cache_dir(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_root() / "images" / digest


def _read_cache(key: dict[str, Any], listing: list[list[Any]]) -> Any:
    """The memory-mapped inputs if the cache holds this exact listing, else None."""
    from kdcli.storage import map_npy

    d = _cache_dir(key)
    try:
        manifest = json.loads((d / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if (not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT
            or manifest.get("version") != CACHE_VERSION or manifest.get("key") != key
            or manifest.get("files") != listing):
        return None
    try:
        mapped = map_npy(d / "inputs.npy")
    except OSError:
        return None
    if mapped is None or mapped[0].shape[0] != len(listing):
        return None
    return mapped


def _open(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}: {_first(e)}",
                        "Replace or remove the file") from e


def decode_image(path: Path, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    """One image as uint8 ``[H, W]`` (mode ``L``) or ``[3, H, W]`` (mode ``RGB``).

    Raises:
        DataError: the file is not a readable image (naming it).
    """
    import numpy as np
    from PIL import Image

    img = _open(path)
    try:
        with img:
            img.load()
            img = img.convert(mode)
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            a = np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}: {_first(e)}",
                        "Replace or remove the file") from e
    return a if mode == "L" else a.transpose(2, 0, 1)


def _plan(paths: list[Path], opts: DataOptions) -> tuple[str, tuple[int, int]]:
    """The Pillow mode and ``(H, W)`` of the decoded folder, from the headers alone."""
    size, first, colour = opts.image_size, None, False
    for p in paths:
        with _open(p) as img:
            bands, (w, h) = set(img.getbands()), img.size
        colour = colour or bands not in _GRAY_BANDS
        if opts.image_size is None:
            if first is None:
                first, size = p, (h, w)
            elif (h, w) != size:
                raise DataError(f"images differ in size: {first} is {size[1]}x{size[0]}, "
                                f"{p} is {w}x{h} (width x height)",
                                "Pass --image-size H,W to resize them all")
    channels = opts.channels or (3 if colour else 1)
    assert size is not None
    return ("L" if channels == 1 else "RGB"), size


def _decode_all(folder: Path, paths: list[Path], opts: DataOptions, key: dict[str, Any],
                listing: list[list[Any]]) -> Any:
    """Decode every image into the cache (or into memory if the cache cannot be written).

    The sizes are checked against the memory (and the cache's space is reserved) before
    anything is decoded; the cache is written with ordinary writes, never through a memory
    map, so a full disk is an error (or a fallback to memory), not a SIGBUS.
    """
    import numpy as np

    mode, size = _plan(paths, opts)
    shape = (len(paths), *size) if mode == "L" else (len(paths), 3, *size)
    _check_image_memory(shape)
    d = _cache_dir(key)
    cache = _reserve_cache(d, math.prod(shape))
    if cache is None:
        _check_folder_memory(shape)
        out = np.empty(shape, dtype=np.uint8)
        for i, p in enumerate(paths):
            out[i] = decode_image(p, mode, size)
        return out
    fd, tmp = cache
    try:
        with os.fdopen(fd, "r+b") as f:
            f.write(_npy_header(shape))
            for p in paths:
                f.write(decode_image(p, mode, size).tobytes())
            f.truncate()  # drop the reserve beyond the header's few bytes
        return _place_cache(d, tmp, key, shape, listing)
    except OSError as e:
        raise DataError(f"cannot write the image cache in {d}: {_first(e)}",
                        "Free space, or set KDCLI_CACHE to a writable folder with room") from e
    finally:
        tmp.unlink(missing_ok=True)


def _check_image_memory(shape: tuple[int, ...]) -> None:
    """One image, decoded and resized (Pillow holds 4 bytes a pixel), must fit in memory."""
    from kdcli.resources import check_memory

    h, w = shape[-2:]
    check_memory(h * w * (8 + 2 * math.prod(shape[1:-2])),
                 f"decoding one image at {h}x{w} pixels (height x width)",
                 "Lower --image-size")


def _check_folder_memory(shape: tuple[int, ...]) -> None:
    from kdcli.resources import check_memory

    check_memory(math.prod(shape), f"the {shape[0]:,} decoded images of shape "
                 f"{list(shape[1:])} (not cached: the cache cannot be written or has no room)",
                 "Lower --image-size, or set KDCLI_CACHE to a folder with room")


def _npy_header(shape: tuple[int, ...]) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
              "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _reserve_cache(d: Path, nbytes: int) -> tuple[int, Path] | None:
    """A new temporary array file in the cache folder ``d``, its space reserved, as an open
    descriptor and its path; None if the cache cannot be written or has no room.

    Temporaries that dead processes left in ``d`` (killed mid-decode) are removed first."""
    from kdcli.files import remove_stale_temps, temp_path

    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    remove_stale_temps(d / "inputs.npy")
    remove_stale_temps(d / "manifest.json")
    tmp = temp_path(d / "inputs.npy")
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return None
    reserve = getattr(os, "posix_fallocate", None)  # not on macOS: ordinary writes only
    try:
        if reserve is not None:
            reserve(fd, 0, nbytes + 4096)  # the header is under 4 KiB
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # the file system cannot reserve
            return fd, tmp
        os.close(fd)
        tmp.unlink(missing_ok=True)
        return None
    return fd, tmp


def _place_cache(d: Path, tmp: Path, key: dict[str, Any], shape: tuple[int, ...],
                 listing: list[list[Any]]) -> Any:
    """Rename the decoded array into the cache and write its manifest; the mapped array.

    If the cache's entries cannot be replaced (an entry is a folder), the temporary is
    mapped and then removed, so the images are used this once without a cache."""
    from kdcli.files import temp_path
    from kdcli.storage import map_npy

    target, manifest_path = d / "inputs.npy", d / "manifest.json"
    mtmp = temp_path(manifest_path)
    try:
        if manifest_path.is_symlink() or manifest_path.exists():
            os.unlink(manifest_path)
        os.replace(tmp, target)
        manifest = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key,
                    "shape": list(shape), "files": listing}
        mtmp.write_text(json.dumps(manifest))
        os.replace(mtmp, manifest_path)
    except OSError:
        return map_npy(tmp) if tmp.exists() else map_npy(target)
    finally:
        mtmp.unlink(missing_ok=True)
    return map_npy(target)


def _first(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
