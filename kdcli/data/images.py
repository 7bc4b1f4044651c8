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
whose listing matches memory-maps the array instead of decoding, after checking its dtype,
shape, SHA-256 and three of its rows against the images; any added, removed, renamed or
touched file, or a cache entry that fails a check, makes it decode afresh. 16-bit grey
images are scaled to 8 bits, not clipped.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from kdcli.data.base import DataOptions, Loaded, first_line
from kdcli.errors import DataError, quote_name
from kdcli.io.files import (
    inside_folder,
    open_regular,
    remove_stale_temps,
    sha256_file,
    temp_path,
)
from kdcli.io.storage import map_npy
from kdcli.resources import check_memory

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
CACHE_FORMAT = "kdcli.image-cache"
CACHE_VERSION = 2  # 2: the manifest records data_sha256
_GRAY_BANDS = ({"L"}, {"L", "A"}, {"1"}, {"I"}, {"F"})


def cache_root() -> Path:
    """Where decoded folders are cached: ``$KDCLI_CACHE``, else ``$XDG_CACHE_HOME/kdcli``
    or ``~/.cache/kdcli``."""
    if os.environ.get("KDCLI_CACHE"):
        return Path(os.environ["KDCLI_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kdcli"


def read(path: Path, split: str, options: DataOptions) -> Loaded:
    """The data source's reader: :func:`load_image_folder`."""
    return load_image_folder(path, options)


def load_image_folder(folder: Path, opts: DataOptions) -> Loaded:
    """Read an image folder (see the module docstring), from the cache when it is current.

    Returns:
        ``inputs`` as ``(tensor, MappedFile)`` (from the cache) or a numpy array, labels
        and class names (None for a flat folder).

    Raises:
        DataError: no images; mixed sizes without ``--image-size``; an unreadable image
            (naming the file); a link leading out of the folder.
    """
    files, classes = scan(folder)
    listing = [[str(p.relative_to(folder)), st.st_size, st.st_mtime_ns] for p, _, st, _ in files]
    labels = None if classes is None else np.array([k for *_, k in files], dtype=np.int64)
    key = {"folder": str(folder.resolve()), "channels": opts.channels,
           "image_size": list(opts.image_size) if opts.image_size else None}
    cached = _read_cache(key, listing)
    if cached is not None:
        return Loaded(cached, labels, classes)
    inputs = _decode_all(folder, [(real, st) for _, real, st, _ in files], opts, key,
                         listing)
    return Loaded(inputs, labels, classes)


# (path as named, path to open: the named one, or where a link inside the folder leads; stat)
Found = tuple[Path, Path, os.stat_result]


def scan(folder: Path, extensions: tuple[str, ...] = EXTENSIONS, what: str = "images",
         ) -> tuple[list[tuple[Path, Path, os.stat_result, int]], list[str] | None]:
    """The image files (or files ending in one of ``extensions``, called ``what``) of a
    folder in example order, each as (path as named, path to open, ``stat``, class index),
    and the class names (None for a flat folder).

    Links are read (``lstat``, ``readlink``), never followed out of the folder: a link that
    leads out, from the folder itself or naming an image, is refused before its target is
    touched. Only regular files are images; links to folders below a class folder are not
    followed (as ``rglob`` does not)."""
    root = Path(os.path.realpath(folder))
    top = _entries(folder, root, folder, root, extensions, top=True)
    subdirs = sorted((e for e in top if stat.S_ISDIR(e[2].st_mode)), key=lambda e: e[0].name)
    per_class = [(named.name, _images_under(folder, root, named,
                                            root / named.name if real == named else real,
                                            extensions))
                 for named, real, _ in subdirs]
    if any(found for _, found in per_class):
        classes = [name for name, _ in per_class]
        files = [(*f, k) for k, (_, found) in enumerate(per_class) for f in found]
        files.sort(key=lambda f: (_natural(f[0].name), f[3], _natural(str(f[0]))))
    else:
        classes = None
        files = [(*f, -1) for f in sorted((f for f in top if _is_image(f, extensions)),
                                          key=lambda f: _natural(f[0].name))]
    if not files:
        raise DataError(f"folder {quote_name(folder)} holds no {what} ({', '.join(extensions)})",
                        f"Use DIR/CLASS/*{extensions[0]} (labelled) or DIR/*{extensions[0]} "
                        "(unlabelled)")
    return files, classes


def _is_image(f: Found, extensions: tuple[str, ...] = EXTENSIONS) -> bool:
    return stat.S_ISREG(f[2].st_mode) and f[0].suffix.lower() in extensions


def _entries(folder: Path, root: Path, named_dir: Path, real_dir: Path,
             extensions: tuple[str, ...], top: bool) -> list[Found]:
    """The visible entries of the real folder ``real_dir`` (inside ``root``), links read
    without touching anything outside ``root``."""
    out = []
    with os.scandir(real_dir) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            named, image = named_dir / e.name, Path(e.name).suffix.lower() in extensions
            if not e.is_symlink():
                out.append((named, named, e.stat(follow_symlinks=False)))
                continue
            real = inside_folder(root, os.path.relpath(real_dir / e.name, root))
            if real is None:
                if top or image:
                    raise DataError(
                        f"{quote_name(named)} is a link to "
                        f"{quote_name(os.readlink(real_dir / e.name))}, outside "
                        f"{quote_name(folder)}", "Copy the file into the folder, or remove the "
                        "link")
                continue  # a link below a class folder that names no image: never followed
            with contextlib.suppress(OSError):  # a dangling link is skipped
                out.append((named, real, os.stat(real)))
    return out


def _images_under(folder: Path, root: Path, named_dir: Path, real_dir: Path,
                  extensions: tuple[str, ...]) -> list[Found]:
    found = []
    for named, real, st in _entries(folder, root, named_dir, real_dir, extensions, top=False):
        if stat.S_ISDIR(st.st_mode) and real == named:  # not a link
            found += _images_under(folder, root, named, real_dir / named.name, extensions)
        elif _is_image((named, real, st), extensions):
            found.append((named, real, st))
    return found


def _natural(s: str) -> list[Any]:
    """Sort key comparing runs of digits as numbers: 2.png before 10.png."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", s) if t]


def _cache_dir(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_root() / "images" / digest


def _read_cache(key: dict[str, Any], listing: list[list[Any]]) -> Any:
    """The memory-mapped inputs if the cache holds this exact listing, else None. Only
    regular files are read: a link, FIFO or device planted in the cache is not opened."""
    d = _cache_dir(key)
    try:
        with os.fdopen(open_regular(d / "manifest.json", "cache file"), "rb") as f:
            manifest = json.loads(f.read())
    except (OSError, ValueError, DataError):
        return None
    if (not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT
            or manifest.get("version") != CACHE_VERSION or manifest.get("key") != key
            or manifest.get("files") != listing):
        return None
    try:
        os.close(open_regular(d / "inputs.npy", "cache file"))
        mapped = map_npy(d / "inputs.npy")
    except (OSError, DataError):
        return None
    if mapped is None or mapped[0].shape[0] != len(listing):
        return None
    return mapped if _cache_is_true(d, mapped[0], manifest, key) else None


def _cache_is_true(d: Path, x: Any, manifest: dict[str, Any], key: dict[str, Any]) -> bool:
    """Whether a cached array is what decoding the folder gives: uint8 of the recorded shape
    ``[N, H, W]`` or ``[N, 3, H, W]`` (of ``--channels`` and ``--image-size``, if given),
    the bytes the manifest's ``data_sha256`` names, and the first, middle and last images
    decoded again equal to their rows."""
    shape = list(x.shape)
    if x.dtype != torch.uint8 or shape != manifest.get("shape") or len(shape) not in (3, 4) \
            or (len(shape) == 4 and shape[1] != 3) \
            or (key["channels"] is not None and key["channels"] != (1 if len(shape) == 3 else 3)) \
            or (key["image_size"] is not None and shape[-2:] != key["image_size"]):
        return False
    if sha256_file(d / "inputs.npy") != manifest.get("data_sha256"):
        return False
    mode, size = ("L" if len(shape) == 3 else "RGB"), tuple(shape[-2:])
    folder, files = Path(key["folder"]), manifest["files"]
    try:
        for i in sorted({0, len(files) // 2, len(files) - 1}):
            real = inside_folder(folder, files[i][0])  # an image may be a link inside it
            if real is None or not bool((x[i] == torch.from_numpy(
                    decode_image(real, mode, size))).all()):
                return False
        return True
    except DataError:
        return False


@contextlib.contextmanager
def _open(path: Path, expect: os.stat_result | None = None) -> Iterator[Any]:
    """The image at ``path`` opened with Pillow, without following a link in its last
    component or blocking on a FIFO; with ``expect``, the file must be the one scanned
    (same device and inode), so a file swapped for a link or another file is refused."""
    try:
        f = os.fdopen(open_regular(path, "image"), "rb")
    except OSError as e:
        raise DataError(f"cannot read image {quote_name(path)}: {first_line(e)}",
                        "Replace or remove the file") from e
    with f:
        st = os.fstat(f.fileno())
        if expect is not None and (st.st_dev, st.st_ino) != (expect.st_dev, expect.st_ino):
            raise DataError(f"image {quote_name(path)} was replaced while the folder was "
                            "read", "Rerun once nothing changes the folder")
        try:
            img = Image.open(f)
        except (OSError, UnidentifiedImageError, ValueError,
                Image.DecompressionBombError) as e:
            raise DataError(f"cannot read image {quote_name(path)}: {first_line(e)}",
                            "Replace or remove the file") from e
        with img:
            yield img


def decode_image(path: Path, mode: str, size: tuple[int, int] | None,
                 expect: os.stat_result | None = None) -> np.ndarray:
    """One image as uint8 ``[H, W]`` (mode ``L``) or ``[3, H, W]`` (mode ``RGB``).

    Args:
        path: The image file (a link in its last component is refused).
        mode: ``L`` or ``RGB``.
        size: ``(H, W)`` to resize to, or None.
        expect: The file's ``stat`` when the folder was scanned: a different file is refused.

    Raises:
        DataError: the file is not a readable image (naming it), or was replaced.
    """
    try:
        with _open(path, expect) as img:
            img.load()
            img = _eight_bit(img).convert(mode)
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            a = np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {quote_name(path)}: {first_line(e)}",
                        "Replace or remove the file") from e
    return a if mode == "L" else a.transpose(2, 0, 1)


def _eight_bit(img: Any) -> Any:
    """16-bit (and 32-bit integer) grey images scaled to 8 bits, as Pillow's ``convert``
    would clip them: ``round(v / 257)``, so 65535 is 255."""
    if not (img.mode.startswith("I;16") or img.mode == "I"):
        return img
    a = np.asarray(img).astype(np.float64)
    if img.mode == "I" and a.size and (a.min() < 0 or a.max() > 65535):
        raise ValueError(f"{img.mode} pixels from {a.min():g} to {a.max():g} are not 16-bit")
    return Image.fromarray(np.round(a / 257).astype(np.uint8), "L")


def _plan(paths: list[tuple[Path, os.stat_result]],
          opts: DataOptions) -> tuple[str, tuple[int, int]]:
    """The Pillow mode and ``(H, W)`` of the decoded folder, from the headers alone."""
    size, first, colour = opts.image_size, None, False
    for p, st in paths:
        with _open(p, st) as img:
            bands, (w, h) = set(img.getbands()), img.size
        colour = colour or bands not in _GRAY_BANDS
        if opts.image_size is None:
            if first is None:
                first, size = p, (h, w)
            elif (h, w) != size:
                raise DataError(f"images differ in size: {quote_name(first)} is "
                                f"{size[1]}x{size[0]}, {quote_name(p)} is {w}x{h} "
                                "(width x height)", "Pass --image-size H,W to resize them all")
    channels = opts.channels or (3 if colour else 1)
    assert size is not None
    return ("L" if channels == 1 else "RGB"), size


def _decode_all(folder: Path, paths: list[tuple[Path, os.stat_result]], opts: DataOptions,
                key: dict[str, Any], listing: list[list[Any]]) -> Any:
    """Decode every image into the cache (or into memory if the cache cannot be written).

    The sizes are checked against the memory (and the cache's space is reserved) before
    anything is decoded; the cache is written with ordinary writes, never through a memory
    map, so a full disk is an error (or a fallback to memory), not a SIGBUS.
    """
    mode, size = _plan(paths, opts)
    shape = (len(paths), *size) if mode == "L" else (len(paths), 3, *size)
    _check_image_memory(shape)
    d = _cache_dir(key)
    cache = _reserve_cache(d, math.prod(shape))
    if cache is None:
        _check_folder_memory(shape)
        out = np.empty(shape, dtype=np.uint8)
        for i, (p, st) in enumerate(paths):
            out[i] = decode_image(p, mode, size, st)
        return out
    fd, tmp = cache
    try:
        with os.fdopen(fd, "r+b") as f:
            f.write(_npy_header(shape))
            for p, st in paths:
                f.write(decode_image(p, mode, size, st).tobytes())
            f.truncate()  # drop the reserve beyond the header's few bytes
        return _place_cache(d, tmp, key, shape, listing)
    except OSError as e:
        raise DataError(f"cannot write the image cache in {d}: {first_line(e)}",
                        "Free space, or set KDCLI_CACHE to a writable folder with room") from e
    finally:
        tmp.unlink(missing_ok=True)


def _check_image_memory(shape: tuple[int, ...]) -> None:
    """One image, decoded and resized (Pillow holds 4 bytes a pixel), must fit in memory."""
    h, w = shape[-2:]
    check_memory(h * w * (8 + 2 * math.prod(shape[1:-2])),
                 f"decoding one image at {h}x{w} pixels (height x width)",
                 "Lower --image-size")


def _check_folder_memory(shape: tuple[int, ...]) -> None:
    check_memory(math.prod(shape), f"the {shape[0]:,} decoded images of shape "
                 f"{list(shape[1:])} (not cached: the cache cannot be written or has no room)",
                 "Lower --image-size, or set KDCLI_CACHE to a folder with room")


def _npy_header(shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
              "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _reserve_cache(d: Path, nbytes: int) -> tuple[int, Path] | None:
    """A new temporary array file in the cache folder ``d``, its space reserved, as an open
    descriptor and its path; None if the cache cannot be written or has no room.

    Temporaries that dead processes left in ``d`` (killed mid-decode) are removed first."""
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if d.is_symlink():  # a planted link: decode into memory, write nothing through it
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
    target, manifest_path = d / "inputs.npy", d / "manifest.json"
    mtmp = temp_path(manifest_path)
    try:
        if manifest_path.is_symlink() or manifest_path.exists():
            os.unlink(manifest_path)
        os.replace(tmp, target)
        manifest = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key,
                    "shape": list(shape), "files": listing,
                    "data_sha256": sha256_file(target)}
        mtmp.write_text(json.dumps(manifest))
        os.replace(mtmp, manifest_path)
    except OSError:
        return map_npy(tmp) if tmp.exists() else map_npy(target)
    finally:
        mtmp.unlink(missing_ok=True)
    return map_npy(target)
