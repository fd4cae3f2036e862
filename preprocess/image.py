"""The per-image transform: source file bytes -> 256x256 RGB baseline JPEG.

What the AlexNet paper does to every image: rescale so that the shorter side is 256, then take the
central 256x256 patch. Decoding the source JPEG is nearly all of the cost, so the JPEG path is
built around libjpeg-turbo (through simplejpeg) and its DCT-domain scaling: a 2000x1500 photo is
decoded straight to 500x375 (1/4) without ever materialising the full-size image.

Decisions, each measured or forced by the data (docs/BENCHMARKS.md has the figures):

* Only the scale factors 1/8, 1/4, 1/2 and 1 are used, although libjpeg-turbo offers every M/8.
  The power-of-two factors have SIMD inverse DCTs and upsamplers; the others (3/8, 5/8, 6/8, 7/8)
  run plain C and are *slower than a full-size decode* (500x375 at 6/8: ~1.5x the time of 8/8).
  The decoded image's shorter side is the smallest such scale that still keeps it >= the target,
  so the resize afterwards only ever shrinks by less than 2x (or upscales a small source).
* One resampling pass: PIL ``resize`` with ``box=`` maps the central square straight to size x size
  (BILINEAR with PIL's antialiasing support, like the torchvision/PIL reference pipelines).
* Output: baseline JPEG, 4:2:0 chroma subsampling, quality 90 by default, encoded by libjpeg-turbo
  (simplejpeg); what DALI's and PIL's decoders read fastest.
* CMYK / YCCK JPEGs (Adobe's inverted CMYK included) and anything TurboJPEG cannot read go through
  PIL, with ``draft()`` so that they are still decoded at a reduced DCT scale; PIL converts CMYK
  to RGB naively (no ICC profile), as every ImageNet pipeline does. ICC profiles are ignored.
* Non-JPEG files (ImageNet has a PNG named .JPEG) are decoded by content with PIL. Transparency is
  composited on white (transparent product shots and logos are meant to be seen on a white page;
  dropping alpha would expose whatever colour the transparent pixels happen to hold). 16-bit
  images keep their 8 most significant bits.
* Memory: a decode never produces more than ``MAX_DECODED_PIXELS``. JPEGs are decoded at a
  coarser DCT scale to stay below it (a 10000x10000 JPEG is decoded at 1/8 = 1250x1250); formats
  without reduced decoding (PNG, GIF, TIFF...) larger than the limit are skipped with the reason
  "image too large (WxH)". Those are box-reduced right after decoding, before any conversion, and
  oriented last, so the full-size pixels exist once: about 4 bytes a decoded pixel (PIL's RGB),
  up to 8 for images with transparency or 16-bit samples (one converted copy); README states
  the budget.
* A JPEG whose frame header claims more pixels than its data can encode (at least one bit per 8x8
  block) is rejected: libjpeg would fill the missing blocks with grey and only warn.
* Bad data raises :class:`BadImage` only, with a short reason for the manifest's ``skipped`` list.
  JPEGs that end early are rejected ("truncated JPEG"); JPEGs with other *recoverable* damage
  that libjpeg repairs (stray bytes before a marker, ...) are accepted, as PIL would accept them.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable

import numpy as np
import simplejpeg
from PIL import Image, JpegImagePlugin, UnidentifiedImageError

from preprocess.format import IMAGE_SIZE

DEFAULT_QUALITY = 90
# 64 MP: 192 MB as an RGB array (PIL holds 4 bytes a pixel, so ~256 MB), the most one worker of
# many may hold for one image. Well above any ImageNet image; PIL's own bomb warning is at 89 MP.
MAX_DECODED_PIXELS = 64_000_000
# DCT scale denominators with SIMD code paths in libjpeg-turbo (see the module docstring).
FAST_DCT_DENOMINATORS = (8, 4, 2, 1)
# Chroma subsampling of our output: 4:2:0 like nearly every camera JPEG and ImageNet itself.
OUTPUT_SUBSAMPLING = "420"
RESAMPLE = Image.Resampling.BILINEAR

_JPEG_SOI = b"\xff\xd8\xff"
_HUFFMAN_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7))
_SOF_MARKERS = _HUFFMAN_SOF | {0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # + arithmetic coding
_TURBOJPEG_COLORSPACES = ("YCbCr", "Gray", "RGB")  # what TurboJPEG converts to RGB correctly
_MAX_REASON_DETAIL = 80


class BadImage(Exception):
    """A source file that cannot become a training image; ``str(exc)`` is the short reason."""


# --------------------------------------------------------------------------------------------
# Public API


def process(data: bytes, size: int = IMAGE_SIZE, quality: int = DEFAULT_QUALITY) -> bytes:
    """Source file bytes -> ``size`` x ``size`` RGB baseline JPEG (shorter side to size, centre crop).

    Raises :class:`BadImage` (and nothing else) for files that are not usable images.
    """
    rgb = decode_rgb(data, min_side=size)
    return encode_jpeg(resize_center_crop(rgb, size), quality)


def decode_rgb(data: bytes, min_side: int = 0) -> np.ndarray:
    """Decode any image file to an H x W x 3 uint8 RGB array with its EXIF orientation applied.

    The image is decoded at a reduced scale where the format allows it (JPEG: DCT scaling by 1/2,
    1/4 or 1/8) such that ``min(H, W) >= min_side`` still holds; sources smaller than
    ``min_side`` come back at full size (the caller upscales). Treat the array as read-only
    (arrays from PIL are).
    """
    if not data:
        raise BadImage("empty file")
    if data.startswith(_JPEG_SOI):
        _require_plausible_jpeg_size(data)
        return _decode_jpeg(data, min_side)
    return _decode_with_pil(data, min_side)


def resize_center_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    """Shorter side -> ``size`` with antialiasing, then the central ``size`` x ``size`` patch.

    Done as one resampling pass: PIL maps the central square of the source (fractional box
    coordinates, so no rounding shift) onto the output, which is the same geometry as resizing
    the whole image and cropping, at a fraction of the work. Only the central square, plus the
    filter's reach around it, is copied into PIL when that saves most of the copy (a long
    panorama); otherwise the whole array is, which keeps results bit-identical to the plain
    resize-and-crop (moving the box by whole pixels changes PIL's rounding slightly).
    """
    height, width = rgb.shape[:2]
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    reach = int(side / size) + 2  # the bilinear filter's support in source pixels, rounded up
    x0, y0 = max(0, int(left) - reach), max(0, int(top) - reach)
    x1, y1 = min(width, math.ceil(left + side) + reach), min(height, math.ceil(top + side) + reach)
    if (x1 - x0) * (y1 - y0) * 2 > width * height:
        x0, y0, x1, y1 = 0, 0, width, height
    box = (left - x0, top - y0, left - x0 + side, top - y0 + side)
    patch = Image.fromarray(np.ascontiguousarray(rgb[y0:y1, x0:x1]))
    return np.asarray(patch.resize((size, size), RESAMPLE, box=box))


def encode_jpeg(rgb: np.ndarray, quality: int = DEFAULT_QUALITY) -> bytes:
    """RGB array -> baseline JPEG (4:2:0, standard Huffman tables) by libjpeg-turbo."""
    return simplejpeg.encode_jpeg(
        np.ascontiguousarray(rgb), quality=quality, colorspace="RGB", colorsubsampling=OUTPUT_SUBSAMPLING
    )


def decode_shard_jpeg(data: bytes) -> np.ndarray:
    """Decode one of our own output JPEGs (plain YCbCr baseline) to H x W x 3 uint8 RGB."""
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    except ValueError as e:
        raise BadImage(f"corrupt shard JPEG ({_short(e)})") from None


# --------------------------------------------------------------------------------------------
# JPEG fast path


def dct_denominator(width: int, height: int, min_side: int) -> int:
    """The DCT scale 1/d (d in 8, 4, 2, 1) to decode a width x height JPEG at.

    The smallest fast scale whose shorter side is still >= ``min_side``, made coarser if needed
    to keep the decoded image within ``MAX_DECODED_PIXELS``.
    """
    chosen = 1
    if min_side > 0:
        for d in FAST_DCT_DENOMINATORS:
            if min(_scaled(width, d), _scaled(height, d)) >= min_side:
                chosen = d
                break
    for d in FAST_DCT_DENOMINATORS[::-1]:
        if d >= chosen and _scaled(width, d) * _scaled(height, d) <= MAX_DECODED_PIXELS:
            return d
    raise BadImage(f"image too large ({width}×{height})")


def _scaled(dimension: int, denominator: int) -> int:
    """Size of one dimension decoded at 1/denominator (libjpeg rounds up)."""
    return -(-dimension // denominator)


def _decode_jpeg(data: bytes, min_side: int) -> np.ndarray:
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        # Headers TurboJPEG does not accept (unusual sampling factors, damage): PIL's libjpeg
        # is more lenient and gives the better reason when it fails too.
        return _decode_with_pil(data, min_side)
    if colorspace not in _TURBOJPEG_COLORSPACES:
        return _decode_with_pil(data, min_side)  # CMYK/YCCK: PIL knows Adobe's inverted CMYK
    d = dct_denominator(width, height, min_side)
    rgb, error = _turbo_decode(data, _scaled(width, d), _scaled(height, d))
    if rgb is None:
        # Fatal for TurboJPEG (e.g. 12-bit or lossless JPEG): last chance with PIL (which applies
        # the EXIF orientation itself).
        try:
            return _decode_with_pil(data, min_side)
        except BadImage as e:
            if str(e).startswith("truncated"):
                raise
            # TurboJPEG's message says more than PIL's generic "broken data stream".
            raise BadImage(f"undecodable JPEG ({_short(error)})") from None
    return apply_orientation(rgb, jpeg_orientation(data))


def _require_plausible_jpeg_size(data: bytes) -> None:
    """Reject a JPEG whose header claims more pixels than its data can hold.

    Every 8x8 luma block of a Huffman-coded JPEG costs at least one bit (its DC code), however
    flat the image. libjpeg fills what the data does not cover with grey and only warns, so a
    tiny file claiming 30000x30000 would otherwise decode "successfully" to a flat grey image.
    Arithmetic-coded JPEGs (no such bound) are left to the decoder.
    """
    frame = jpeg_frame(data)
    if frame is None:
        return  # no frame header before the scan: the decoder gives the reason
    marker, width, height = frame
    min_bytes = _scaled(width, 8) * _scaled(height, 8) // 8
    if marker in _HUFFMAN_SOF and len(data) < min_bytes:
        raise BadImage(f"corrupt JPEG (header says {width}×{height}, too large for its {len(data)} bytes)")


def jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """(SOF marker, width, height) from a JPEG's frame header; None if there is none before the scan."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in (0xDA, 0xD9):
            return None
        if marker in _SOF_MARKERS and pos + 9 <= len(data):
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            return marker, width, height
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None


def _turbo_decode(data: bytes, width: int, height: int) -> tuple[np.ndarray | None, Exception | None]:
    """simplejpeg decode at the scale that yields exactly width x height; (None, error) if it can't."""
    # min_height/min_width make simplejpeg pick the smallest scale with at least these sizes,
    # i.e. exactly the scale they were computed from.
    try:
        return simplejpeg.decode_jpeg(data, "RGB", min_height=height, min_width=width), None
    except ValueError as e:
        if "Premature end" in str(e):
            raise BadImage("truncated JPEG") from None
        first_error = e
    try:
        # A warning libjpeg recovered from (e.g. "corrupt data: premature end of data segment"):
        # keep the image, as PIL would. (strict mode stops at the first warning, so a file with
        # such damage *and* a missing end slips through here; both at once are rare.)
        return simplejpeg.decode_jpeg(data, "RGB", min_height=height, min_width=width, strict=False), None
    except ValueError:
        return None, first_error


def jpeg_orientation(data: bytes) -> int:
    """EXIF orientation (1..8) of a JPEG, read from its APP1 segment; 1 if absent or unreadable.

    A few dozen byte reads, where PIL would parse every marker and the whole EXIF directory.
    """
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return 1  # lost in the marker stream: no trustworthy metadata
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in (0xDA, 0xD9):  # start of scan / end of image: metadata comes before these
            return 1
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xE1 and data[pos + 4 : pos + 10] == b"Exif\x00\x00":
            return _tiff_orientation(data[pos + 10 : pos + 2 + length])
        pos += 2 + length
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    """Orientation tag (0x0112) of IFD0 in an EXIF TIFF structure; 1 if absent or malformed."""
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 1

    def uint(offset: int, size: int) -> int:
        return int.from_bytes(tiff[offset : offset + size], order)  # type: ignore[arg-type]

    ifd = uint(4, 4)
    if ifd + 2 > len(tiff):
        return 1
    for i in range(uint(ifd, 2)):
        entry = ifd + 2 + 12 * i
        if entry + 12 > len(tiff):
            break
        if uint(entry, 2) == 0x0112:
            field_type = uint(entry + 2, 2)
            value = uint(entry + 8, 2) if field_type == 3 else uint(entry + 8, 4)  # SHORT or LONG
            return value if 1 <= value <= 8 else 1
    return 1


# How to display an image stored with EXIF orientation N (same result as PIL's exif_transpose).
_ORIENTATION_OPS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # mirrored along the main diagonal
    6: lambda a: np.rot90(a, -1),  # stored rotated 90 counter-clockwise: turn clockwise
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),  # mirrored along the anti-diagonal
    8: lambda a: np.rot90(a, 1),  # stored rotated 90 clockwise: turn counter-clockwise
}


def apply_orientation(rgb: np.ndarray, orientation: int) -> np.ndarray:
    """The array as it should be displayed given its EXIF orientation (C-contiguous)."""
    op = _ORIENTATION_OPS.get(orientation)
    return rgb if op is None else np.ascontiguousarray(op(rgb))


# --------------------------------------------------------------------------------------------
# PIL path: CMYK JPEGs, odd JPEGs, every other format


def _decode_with_pil(data: bytes, min_side: int) -> np.ndarray:
    # PIL warns about plenty that is harmless here (corrupt EXIF, palette transparency, big
    # images that our own limit already handles); the outcome is either an image or BadImage.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = _open_with_pil(data)
        kind = image.format or "image"
        source_mode = image.mode
        dct_scalable = isinstance(image, JpegImagePlugin.JpegImageFile)  # JPEG and MPO
        try:
            image = _load_reduced(image, min_side, dct_scalable)
            orientation = _exif_orientation(image)
            if not dct_scalable:
                image = _box_reduced(image, min_side)
            rgb = _pil_to_rgb(image, source_mode)
        except (BadImage, MemoryError):
            raise
        except Image.DecompressionBombError:
            raise BadImage(f"image too large ({image.width}×{image.height})") from None
        except Exception as e:  # PIL's decoders raise OSError, SyntaxError, ValueError, struct.error...
            raise BadImage(_pil_failure_reason(kind, e)) from None
    # Turned last, on the small array: a full-size transposed copy would double the peak memory.
    return apply_orientation(rgb, orientation)


def _open_with_pil(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        kind = _sniff_format(data)
        if kind is None:
            raise BadImage(_not_an_image_reason(data)) from None
        reason = f"truncated {kind}" if len(data) < 64 else f"undecodable {kind} (broken header)"
        raise BadImage(reason) from None
    except Image.DecompressionBombError as e:
        raise BadImage(f"image too large ({_short(e)})") from None
    except Exception as e:
        raise BadImage(_pil_failure_reason(_sniff_format(data) or "image", e)) from None


def _load_reduced(image: Image.Image, min_side: int, dct_scalable: bool) -> Image.Image:
    """Load pixel data, at a reduced DCT scale for JPEGs; enforce the pixel limit first."""
    width, height = image.size
    if dct_scalable:
        d = dct_denominator(width, height, min_side)
        if d > 1:
            # draft picks the largest power-of-two scale with both sides >= these.
            image.draft(image.mode, (max(1, width // d), max(1, height // d)))
    elif width * height > MAX_DECODED_PIXELS:
        raise BadImage(f"image too large ({width}×{height})")
    image.load()
    return image


def _exif_orientation(image: Image.Image) -> int:
    try:
        orientation = int(image.getexif().get(0x0112, 1))
    except Exception:  # unreadable EXIF: keep the stored orientation rather than lose the image
        return 1
    return orientation if 1 <= orientation <= 8 else 1


def _box_reduced(image: Image.Image, min_side: int) -> Image.Image:
    """Integer box-filter reduction keeping the shorter side >= min_side (non-JPEG sources).

    Done on the decoded image before any conversion, so that the full-size pixels exist once
    (PIL: 4 bytes a pixel) and every later copy is small, as DCT scaling does for JPEGs.
    """
    factor = min(image.size) // min_side if min_side > 0 else 1
    if factor < 2:
        return image
    if image.mode in ("1", "P", "PA") or (image.has_transparency_data and image.mode not in ("RGBA", "LA")):
        # Palette indices and colour keys cannot be averaged: to RGB(A) first.
        image = image.convert("RGBA" if image.has_transparency_data else "RGB")
    elif image.mode.startswith("I;16"):
        image = image.convert("I")
    try:
        return image.reduce(factor)
    except ValueError:  # a mode PIL cannot reduce
        return image.convert("RGBA" if image.has_transparency_data else "RGB").reduce(factor)


def _pil_to_rgb(image: Image.Image, source_mode: str) -> np.ndarray:
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return np.asarray(image)
    if mode.startswith("I") or mode == "F":  # 16/32-bit grey or float: PIL has no scaling conversion
        return np.repeat(_grey_to_uint8(np.asarray(image), source_mode)[:, :, None], 3, axis=2)
    if image.has_transparency_data:  # RGBA, LA, PA, or a palette/colour key with transparency
        return np.asarray(_on_white(image.convert("RGBA")))
    try:
        return np.asarray(image.convert("RGB"))
    except ValueError:
        raise BadImage(f"unsupported colour mode {mode}") from None


def _grey_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit greys -> their 8 most significant bits; 32-bit ints likewise if they exceed 8 bits
    (PIL loads some 8- and 16-bit files as mode "I"); floats clipped to 0..255."""
    if mode.startswith("I;16") or (mode == "I" and values.max(initial=0) > 255):
        return (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
    return np.clip(values, 0, 255).astype(np.uint8)


def _on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


# --------------------------------------------------------------------------------------------
# Reasons


# Signatures of the formats worth naming in a reason when PIL can't even open the file.
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF8", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)


def _sniff_format(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)


def _pil_failure_reason(kind: str, error: BaseException) -> str:
    message = str(error)
    if isinstance(error, EOFError) or "truncated" in message.lower():
        return f"truncated {kind}"
    return f"undecodable {kind} ({_short(error)})"


def _not_an_image_reason(data: bytes) -> str:
    head = data[:1024]
    if head.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html")):
        return "not an image (HTML page)"
    if _looks_like_text(head):
        return "not an image (text file)"
    return "not an image (unrecognised format)"


def _looks_like_text(head: bytes) -> bool:
    if any(b < 0x20 and b not in b"\t\n\r\f" for b in head):
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.reason == "unexpected end of data"  # only a multi-byte character cut at the end
    return True


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= _MAX_REASON_DETAIL else text[: _MAX_REASON_DETAIL - 1] + "…"
