"""Small file helpers: everything that matters is written to a temporary file and renamed into place."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np


def _umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux: /proc/self/status): setting
    it to 0 and back, even briefly, would give files, folders and subprocesses that other threads create meanwhile
    (the experiment drivers write and launch from worker threads) a umask of 0, i.e. world-writable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
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


def replace_folder(tmp: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Put the finished folder ``tmp`` in the place of ``dest``: the old ``dest`` is renamed aside first and deleted
    only once ``tmp`` is in place, so a kill at any moment leaves the old folder or the new one (or both), never
    neither."""
    import shutil

    tmp, dest = Path(tmp), Path(dest)
    old = dest.with_name(f".old-{dest.name}")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


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


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _wrap(draw, text: str, font, width: int) -> list[str]:
    """``text`` broken into lines no wider than ``width`` pixels (a word longer than a line gets a line of its own)."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            trial = f"{line} {word}".strip()
            if line and draw.textlength(trial, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def captioned_grid(images: np.ndarray, captions: list[str], ncols: int, tile: int | None = None,
                   font_size: int = 11) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one image of ``ncols`` columns, each tile scaled to ``tile`` px (default: at least 128,
    nearest-neighbour for small images) with its caption written in full underneath, wrapped to the tile's width."""
    from PIL import Image, ImageDraw

    n, h, w, _ = images.shape
    if len(captions) != n:
        raise ValueError(f"{n} images but {len(captions)} captions")
    tile = tile or max(128, min(w, 256))
    size = (tile, round(h * tile / w))
    font, pad = _font(font_size), 4
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(probe, c, font, tile - 2 * pad) for c in captions]
    line_h = font_size + 3
    rows = -(-n // ncols)
    cell_h = size[1] + pad * 2 + line_h * max(map(len, wrapped))
    canvas = Image.new("RGB", (ncols * (tile + pad) + pad, rows * cell_h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (image, lines) in enumerate(zip(images, wrapped)):
        r, c = divmod(i, ncols)
        x, y = pad + c * (tile + pad), pad + r * cell_h
        resample = Image.NEAREST if w < tile else Image.BICUBIC
        canvas.paste(Image.fromarray(image).resize(size, resample), (x, y))
        for k, line in enumerate(lines):
            draw.text((x + pad, y + size[1] + pad + k * line_h), line, fill="black", font=font)
    return np.asarray(canvas)


def side_by_side(panels: dict[str, np.ndarray], font_size: int = 14, gap: int = 12) -> np.ndarray:
    """Images (e.g. the base's and the trained policy's grids of the same prompts and noise) next to each other in
    one image, each under its title."""
    from PIL import Image, ImageDraw

    font, head = _font(font_size), font_size + 10
    height = max(p.shape[0] for p in panels.values()) + head
    width = sum(p.shape[1] for p in panels.values()) + gap * (len(panels) - 1)
    canvas = Image.new("RGB", (width, height), "white")
    draw, x = ImageDraw.Draw(canvas), 0
    for title, panel in panels.items():
        draw.text((x + 6, 4), title, fill="black", font=font)
        canvas.paste(Image.fromarray(panel), (x, head))
        x += panel.shape[1] + gap
    return np.asarray(canvas)
