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
    """Open any common image as 8-bit RGB: grayscale, palette, CMYK, 16-bit and alpha images are converted.

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
    if img.mode == 'P' and 'transparency' in img.info:
        img = img.convert('RGBA')
    if img.mode in ('RGBA', 'LA', 'PA'):
        background = Image.new('RGBA', img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert('RGBA'))
    return img.convert('RGB')


def _reason(error):
    """PIL's message without the file object it quotes (the path is named already), on one line."""
    text = re.sub(r'<_io\.\w+ name=[^>]*>', 'the file', str(error)) or 'empty file'
    return ' '.join(text.split())[:120]
