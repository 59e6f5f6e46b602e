"""A checksummed cache of generated arrays: one array file and one JSON manifest per key, written atomically and
verified on every read. digits-C (:mod:`entreg.data.digits_c`) and the on-the-fly ImageFolder corruptions
(:mod:`entreg.data.folder_c`) keep their sets in it."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = ["ArrayCache", "cache_root", "package_versions", "sha256_array", "write_atomic"]

FORMATS = ("npz", "npy")
_CHUNK = 64 * 2**20  # bytes hashed at a time, so a memory-mapped array is never read whole


def cache_root() -> Path:
    """``$ENTREG_CACHE``, or ``~/.cache/entreg`` when it is unset."""
    return Path(os.environ.get("ENTREG_CACHE", "~/.cache/entreg")).expanduser()


def sha256_array(array: np.ndarray) -> str:
    """The sha256 of ``array``'s bytes in C order, read in chunks (a memory-mapped array stays on disk).

    Example:
        >>> sha256_array(np.zeros((2, 3), dtype=np.uint8)) == sha256_array(np.zeros(6, dtype=np.uint8))
        True
    """
    digest = hashlib.sha256()
    if array.ndim == 0 or array.size == 0:
        digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()
    rows = max(1, _CHUNK // max(1, array[0].nbytes))
    for start in range(0, len(array), rows):
        digest.update(np.ascontiguousarray(array[start : start + rows]).tobytes())
    return digest.hexdigest()


def package_versions(names: Iterable[str]) -> dict[str, str | None]:
    """The installed version of each package (``None`` when it is not installed)."""

    def one(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {name: one(name) for name in names}


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write to a temporary file in ``path``'s folder, then rename it: readers see the old file or the new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class ArrayCache:
    """Arrays generated on the first request and read back from ``cache_dir`` afterwards.

    A key is a file stem: ``<stem>.<fmt>`` holds the array, ``<stem>.json`` the manifest (the array's sha256, dtype
    and shape, the ``settings`` that made it, the caller's ``source`` description and the ``versions`` of the packages
    that made it). Every read recomputes the sha256 and checks the settings, and raises ``RuntimeError`` naming the
    file on a mismatch or an unreadable file (delete both files to regenerate): a damaged set is never used, nor
    silently replaced by one that other package versions may have made different. Both files are written to a
    temporary name and renamed, the manifest last, so concurrent processes (DDP ranks) never read a half-written file.

    Args:
        cache_dir: folder of the files (created on the first write).
        fmt: ``"npz"`` (compressed, read whole) or ``"npy"`` (read memory-mapped: large sets stay on disk).

    Attributes:
        generated: how many arrays this instance generated rather than read.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     cache = ArrayCache(folder, fmt="npy")
        ...     first = cache.get("ones", {"n": 3}, lambda: np.ones(3))
        ...     again = cache.get("ones", {"n": 3}, lambda: np.zeros(3))  # read back, checksum verified
        ...     print(again.tolist(), cache.generated)
        [1.0, 1.0, 1.0] 1
    """

    def __init__(self, cache_dir: str | os.PathLike, fmt: str = "npz") -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown cache format {fmt!r}; valid: {list(FORMATS)}")
        self.cache_dir, self.fmt = Path(cache_dir).expanduser(), fmt
        self.generated = 0

    def paths(self, stem: str) -> tuple[Path, Path]:
        """The array file and the manifest of key ``stem``."""
        return self.cache_dir / f"{stem}.{self.fmt}", self.cache_dir / f"{stem}.json"

    def get(
        self,
        stem: str,
        settings: Mapping[str, Any],
        generate: Callable[[], np.ndarray],
        source: Mapping[str, Any] | None = None,
        packages: Iterable[str] = ("numpy",),
    ) -> np.ndarray:
        """The array of key ``stem``: read and verified when its manifest exists, else ``generate()``-d and stored.

        ``settings`` (JSON values) must equal the manifest's: a stem reused for other settings is an error.
        ``source`` is recorded in a new manifest, for people; ``packages`` are the packages whose versions it records.
        """
        settings = json.loads(json.dumps(dict(settings)))  # as the manifest will hold them (tuples become lists)
        array_path, manifest_path = self.paths(stem)
        if manifest_path.exists():
            return self._load(array_path, manifest_path, settings)
        array = generate()
        manifest = {
            "sha256": sha256_array(array),
            "dtype": str(array.dtype),
            "shape": list(array.shape),
            "settings": settings,
            "source": dict(source or {}),
            "versions": package_versions(packages),
        }
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        if self.fmt == "npz":
            write_atomic(array_path, lambda f: np.savez_compressed(f, images=array))
        else:
            write_atomic(array_path, lambda f: np.save(f, array, allow_pickle=False))
        write_atomic(manifest_path, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        self.generated += 1
        return np.load(array_path, mmap_mode="r") if self.fmt == "npy" else array

    def _read(self, array_path: Path) -> np.ndarray:
        if self.fmt == "npy":
            return np.load(array_path, mmap_mode="r", allow_pickle=False)
        with np.load(array_path, allow_pickle=False) as npz:
            return npz["images"]

    def _load(self, array_path: Path, manifest_path: Path, settings: dict[str, Any]) -> np.ndarray:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("settings") != settings:
            raise RuntimeError(f"{manifest_path} was made for {manifest.get('settings')}, not for {settings}")
        try:
            array = self._read(array_path)
        except Exception as err:  # missing, truncated or not an array file: numpy raises many kinds
            raise RuntimeError(f"cannot read {array_path} ({err}); delete it and {manifest_path.name}") from err
        found = (sha256_array(array), str(array.dtype), list(array.shape))
        if found != (manifest["sha256"], manifest["dtype"], manifest["shape"]):
            raise RuntimeError(
                f"{array_path} does not match its manifest {manifest_path.name} (sha256, dtype, shape): "
                f"it was changed or damaged; delete both files to regenerate"
            )
        return array
