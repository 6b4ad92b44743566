"""Atomic file writes: a crash leaves either the old file or the new one, never half of one.

Write to a temporary name in the same directory, fsync, rename over the target, fsync the
directory so the rename itself survives a power cut. Figures (loss.png, the report's, the model
card's) are saved the same way, through save_figure.
"""

import hashlib
import os
import tempfile


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path, data):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(path) + "-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256(path):
    """Hex sha256 of a file, read in blocks (checkpoints and model weights do not fit in memory twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def figure(width, height):
    """A matplotlib figure and its axes, drawn off-screen (no display on a training machine)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def save_figure(fig, path):
    """Write a figure as a PNG under a temporary name, then rename: a reader never sees half a PNG."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
