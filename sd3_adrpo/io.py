"""Small file helpers: everything that matters is written to a temporary file and renamed into place."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place, with the mode an ordinary
    ``open`` would give (0644 under the usual umask; mkstemp's own 0600 would hide results from colleagues)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one JSON line and flush it to disk (a crash loses at most the line being written)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSONL log. A torn last line (a write cut short by a crash or a full disk) is dropped with a
    warning; a bad line anywhere else is an error naming it."""
    path = Path(path)
    lines = [(i, ln) for i, ln in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
             if ln.strip()]
    rows = []
    for i, line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != lines[-1][0]:
                raise ValueError(f"{path}: line {i} is not JSON; only a torn last line is dropped") from None
            print(f"warning: {path}: dropping its torn last line {i} ({line[:60]!r}...), written when the run was cut off")
    return rows


def image_grid(images: np.ndarray, ncols: int) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows*H, ncols*W, 3) image, row-major; missing cells stay black."""
    n, h, w, c = images.shape
    rows = -(-n // ncols)
    grid = np.zeros((rows * h, ncols * w, c), dtype=np.uint8)
    for i, im in enumerate(images):
        r, col = divmod(i, ncols)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = im
    return grid


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
