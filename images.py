"""Decoding any image file to 8-bit RGB, and the error that names a file that cannot be decoded."""
import io
import os
import re

import numpy as np
from PIL import Image

from utils import UserError


class BadImageError(UserError):
    """An image file that cannot be decoded."""


def load_rgb(path, data=None):
    """Open any common image as 8-bit RGB: grayscale, palette, CMYK, 16-bit and alpha images are converted; an alpha
    channel is dropped and an EXIF orientation is not applied (the pixels as stored), as in DeiT and both backends.

    data: the file's bytes when they were read elsewhere (an LMDB); `path` then only names the image in errors.
    """
    if data is None and not os.path.isfile(path):  # a named pipe would block open() forever
        raise BadImageError(f'unreadable image {path} (not a regular file); remove it or pass --skip-bad-images')
    try:
        with (open(path, 'rb') if data is None else io.BytesIO(data)) as f:
            img = Image.open(f)
            img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(f'unreadable image {path} ({type(e).__name__}: {_reason(e)}); '
                            'remove or replace it, or pass --skip-bad-images') from e
    if img.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr * 255.0 / peak, 0, 255).astype(np.uint8), 'L')
    return img.convert('RGB')  # alpha dropped: the stored colours, as torchvision's loader (DeiT's) and DALI read them


def _reason(error):
    """PIL's message without the file object it quotes (the path is named already), on one line."""
    text = re.sub(r'\s*<_io\.\w+ name=[^>]*>', '', str(error)) or 'empty file'
    return ' '.join(text.split())[:120]


class UndecodedJPEG:
    """A JPEG opened with its header read but its pixels not decoded: the first transform picks its crop from
    `size` and then decodes only as much as that crop needs (ReducedDecodeRandomResizedCrop). The file is opened
    once, here, and closed by decode()."""

    def __init__(self, path, image):
        self.path, self.image = path, image

    @property
    def size(self):
        return self.image.size

    def decode(self, reduction=1):
        """The image as RGB, decoded at about 1 / reduction of its size by libjpeg's DCT scaling (1, 2, 4 or 8)."""
        try:
            with self.image as img:
                if reduction > 1:
                    img.draft('RGB', (max(1, img.size[0] // reduction), max(1, img.size[1] // reduction)))
                img.load()
                return img.convert('RGB')
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise BadImageError(f'unreadable image {self.path} ({type(e).__name__}: {_reason(e)}); '
                                'remove or replace it, or pass --skip-bad-images') from e


def open_image(path, data=None):
    """What a training crop that decodes only what it needs reads: a JPEG in RGB or grayscale as an UndecodedJPEG,
    any other image decoded by load_rgb. data: the file's bytes when they were read elsewhere (a shard)."""
    if path.lower().endswith(('.jpg', '.jpeg')) and (data is not None or os.path.isfile(path)):
        try:
            img = Image.open(path if data is None else io.BytesIO(data))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            img = None  # load_rgb names the file and the reason
        if img is not None and img.format == 'JPEG' and img.mode in ('RGB', 'L'):
            return UndecodedJPEG(path, img)
        if img is not None:
            img.close()
    return load_rgb(path, data)
