"""The per-image transform (preprocess.image): geometry, colour handling, orientation, bad files, speed paths."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps, JpegImagePlugin

from preprocess import image
from preprocess.image import BadImage
from tests.support import flags

RED, GREEN, BLUE, WHITE, GREY = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (128, 128, 128)


def jpeg_bytes(img: Image.Image, quality: int = 95, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, **kwargs)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def near(pixel: np.ndarray, colour: tuple[int, int, int], tol: int = 40) -> bool:
    return bool(np.all(np.abs(pixel.astype(int) - np.array(colour)) <= tol))


def marked_wide_image(width: int = 600, height: int = 300) -> Image.Image:
    """Green outside the central square, red/blue bands just inside its left/right edges, white centre."""
    img = Image.new("RGB", (width, height), GREEN)
    draw = ImageDraw.Draw(img)
    left = (width - height) // 2
    draw.rectangle((left, 0, left + height - 1, height - 1), fill=GREY)
    band = height // 10
    draw.rectangle((left, 0, left + band - 1, height - 1), fill=RED)
    draw.rectangle((left + height - band, 0, left + height - 1, height - 1), fill=BLUE)
    c = width // 2, height // 2
    draw.rectangle((c[0] - 10, c[1] - 10, c[0] + 9, c[1] + 9), fill=WHITE)
    return img


def natural_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth gradients, shapes with edges and mild noise: photo-like enough for PSNR checks."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([120 + 80 * np.sin(x / width * 3 + c) * np.cos(y / height * 2 - c) for c in range(3)], axis=2)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        box = (x0, y0, x0 + rng.uniform(0.05, 0.4) * width, y0 + rng.uniform(0.05, 0.4) * height)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    noisy = np.asarray(img).astype(np.int16) + rng.normal(0, 3, (height, width, 3)).astype(np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def pil_reference(data: bytes, size: int = 256) -> np.ndarray:
    """Plain PIL: full decode, shorter side -> size (BILINEAR), exact centre crop."""
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    w, h = img.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR, box=box))


# --------------------------------------------------------------------------------------------
# Geometry


def band_widths(row: np.ndarray) -> tuple[int, int]:
    return (sum(near(p, RED, 60) for p in row), sum(near(p, BLUE, 60) for p in row))


@pytest.mark.parametrize("tall", [False, True])
def test_center_crop_is_symmetric_and_keeps_the_centre(tall: bool) -> None:
    img = marked_wide_image()
    if tall:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    out = image.decode_shard_jpeg(image.process(jpeg_bytes(img)))
    assert out.shape == (256, 256, 3)
    if tall:
        out = out.transpose(1, 0, 2)
    assert near(out[128, 128], WHITE) and near(out[128 - 6, 128 + 5], WHITE)
    assert not near(out[128, 128 - 15], WHITE) and not near(out[128, 128 + 15], WHITE)
    # Nothing from outside the central square made it in; both edge bands survived, equally wide.
    assert not any(near(p, GREEN, 60) for p in out[128])
    red, blue = band_widths(out[128])
    assert red >= 20 and abs(red - blue) <= 1
    assert near(out[128, 0], RED) and near(out[128, 255], BLUE)


def test_resize_center_crop_geometry_on_arrays() -> None:
    rgb = np.asarray(marked_wide_image(900, 450))
    out = image.resize_center_crop(rgb, 256)
    assert out.shape == (256, 256, 3) and out.dtype == np.uint8
    red, blue = band_widths(out[100])
    assert abs(red - blue) <= 1 and near(out[128, 128], WHITE)


def test_small_images_are_upscaled() -> None:
    img = marked_wide_image(120, 60)
    out = image.decode_shard_jpeg(image.process(png_bytes(img)))
    assert out.shape == (256, 256, 3)
    assert near(out[128, 128], WHITE) and near(out[128, 2], RED) and near(out[128, 253], BLUE)
    assert not any(near(p, GREEN, 60) for p in out[128])


def test_output_is_a_baseline_420_rgb_jpeg() -> None:
    data = image.process(jpeg_bytes(natural_image(500, 375)), quality=90)
    assert data[:3] == b"\xff\xd8\xff" and data.rstrip(b"\x00").endswith(b"\xff\xd9")
    with Image.open(io.BytesIO(data)) as img:
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (256, 256))
        assert not img.info.get("progressive") and not img.info.get("progression")
        assert JpegImagePlugin.get_sampling(img) == 2  # 4:2:0
    assert b"\xff\xc0" in data and b"\xff\xc2" not in data  # SOF0 (baseline), no SOF2 (progressive)


def test_psnr_against_a_plain_pil_pipeline() -> None:
    for width, height in ((500, 375), (2000, 1500), (333, 500)):
        data = jpeg_bytes(natural_image(width, height, seed=width), quality=92)
        reference = pil_reference(data)
        assert psnr(image.decode_shard_jpeg(image.process(data)), reference) >= 30
        # Before our own encoding: identical at full scale, close when DCT-scaled.
        ours = image.resize_center_crop(image.decode_rgb(data, 256), 256)
        assert psnr(ours, reference) >= (99 if width < 512 else 33)


# --------------------------------------------------------------------------------------------
# Scaled decoding and memory


def test_scaled_decode_really_scales() -> None:
    data = jpeg_bytes(natural_image(400, 300).resize((4000, 3000)), quality=60)
    rgb = image.decode_rgb(data, min_side=256)
    assert 256 <= min(rgb.shape[:2]) < 1500
    assert rgb.shape == (375, 500, 3)  # 1/8: the smallest DCT scale that keeps 256
    assert image.decode_rgb(data, min_side=400).shape == (750, 1000, 3)  # 1/4
    assert image.decode_rgb(data, min_side=0).shape == (3000, 4000, 3)


def test_scaled_decode_of_odd_sizes_and_progressive_sources() -> None:
    img = natural_image(1001, 751)
    for data in (jpeg_bytes(img), jpeg_bytes(img, progressive=True)):
        assert image.decode_rgb(data, min_side=256).shape == (376, 501, 3)  # 1/2, rounded up
        assert image.decode_shard_jpeg(image.process(data)).shape == (256, 256, 3)
    tiny_cmyk = jpeg_bytes(Image.new("CMYK", (5, 3), (0, 255, 255, 0)))
    assert image.decode_rgb(tiny_cmyk, min_side=1).shape[2] == 3


def test_dct_denominator_uses_only_fast_scales() -> None:
    assert image.dct_denominator(500, 375, 256) == 1  # 6/8 would fit, but is slower than 8/8
    assert image.dct_denominator(1024, 768, 256) == 2
    assert image.dct_denominator(2048, 1536, 256) == 4
    assert image.dct_denominator(10000, 10000, 256) == 8
    assert image.dct_denominator(100, 80, 256) == 1


def test_huge_jpeg_is_never_decoded_full_size() -> None:
    data = jpeg_bytes(Image.new("L", (10000, 10000), 90), quality=20)
    tracemalloc.start()
    try:
        rgb = image.decode_rgb(data, min_side=256)
        out = image.process(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rgb.shape == (1250, 1250, 3)
    assert peak < 20_000_000  # a full decode would be 300 MB
    assert image.decode_shard_jpeg(out).shape == (256, 256, 3)
    # Even without a target size, the pixel limit keeps the decode scaled.
    assert image.decode_rgb(data).shape[0] <= 5000


def test_pixel_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image, "MAX_DECODED_PIXELS", 10_000)
    with pytest.raises(BadImage, match=r"^image too large \(200×200\)$"):
        image.process(png_bytes(Image.new("RGB", (200, 200), RED)))  # no reduced decode for PNG
    jpeg = jpeg_bytes(Image.new("RGB", (640, 640), RED))
    assert image.decode_rgb(jpeg).shape == (80, 80, 3)  # JPEG: 1/8 fits the limit
    with pytest.raises(BadImage, match="image too large"):
        image.decode_rgb(jpeg_bytes(Image.new("RGB", (1600, 1600), RED)))


# --------------------------------------------------------------------------------------------
# Colour modes and formats


def test_adobe_cmyk_jpeg_comes_out_in_the_right_colours() -> None:
    img = Image.new("CMYK", (300, 200), (0, 255, 255, 0))  # pure red in CMYK
    ImageDraw.Draw(img).rectangle((100, 0, 199, 199), fill=(255, 255, 0, 0))  # pure blue
    data = jpeg_bytes(img)  # PIL writes Adobe's inverted CMYK with an APP14 marker
    rgb = image.decode_rgb(data)
    assert rgb.shape == (200, 300, 3)
    assert near(rgb[100, 20], RED, 10) and near(rgb[100, 150], BLUE, 10)
    out = image.decode_shard_jpeg(image.process(data))
    assert near(out[128, 5], RED, 30) and near(out[20, 128], BLUE, 30) and near(out[128, 250], RED, 30)


def test_cmyk_jpeg_is_also_decoded_scaled() -> None:
    data = jpeg_bytes(Image.new("CMYK", (2400, 1600), (0, 255, 255, 0)), quality=50)
    rgb = image.decode_rgb(data, min_side=256)
    assert rgb.shape == (400, 600, 3) and near(rgb[200, 300], RED, 10)


def test_grayscale_gives_three_equal_channels() -> None:
    grey = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (300, 2)))
    for data in (jpeg_bytes(grey), png_bytes(grey)):
        rgb = image.decode_rgb(data)
        assert rgb.shape == (300, 512, 3)
        assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])
        out = image.decode_shard_jpeg(image.process(data)).astype(int)
        assert np.abs(out[..., 0] - out[..., 1]).max() <= 2 and np.abs(out[..., 1] - out[..., 2]).max() <= 2


def test_png_named_jpeg_is_decoded_by_content() -> None:
    img = natural_image(320, 240)
    rgb = image.decode_rgb(png_bytes(img))
    assert np.array_equal(rgb, np.asarray(img))
    assert image.decode_shard_jpeg(image.process(png_bytes(img))).shape == (256, 256, 3)


def test_transparency_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (300, 300), (255, 0, 0, 0))  # fully transparent red
    ImageDraw.Draw(rgba).rectangle((100, 100, 199, 199), fill=(0, 0, 255, 255))
    rgb = image.decode_rgb(png_bytes(rgba))
    assert near(rgb[10, 10], WHITE, 0) and near(rgb[150, 150], BLUE, 0)
    palette = rgba.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette.info["transparency"] = palette.getpixel((10, 10))
    rgb = image.decode_rgb(png_bytes(palette))
    assert near(rgb[10, 10], WHITE, 0) and near(rgb[150, 150], BLUE, 10)


def test_palette_and_16_bit_pngs() -> None:
    palette = natural_image(200, 150).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    assert np.array_equal(image.decode_rgb(png_bytes(palette)), np.asarray(palette.convert("RGB")))
    ramp = np.tile(np.linspace(0, 65535, 300).astype(np.uint16), (100, 1))
    deep = Image.fromarray(ramp)  # mode I;16
    rgb = image.decode_rgb(png_bytes(deep))
    assert rgb.shape == (100, 300, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0, 0] == 0 and rgb[0, -1, 0] == 255 and abs(int(rgb[0, 150, 1]) - 127) <= 1
    dark = Image.fromarray(np.full((50, 50), 200, np.uint16))  # 16-bit, but every value < 256
    assert image.decode_rgb(png_bytes(dark)).max() == 0


def test_other_formats_by_content() -> None:
    img = natural_image(300, 200)
    for fmt in ("BMP", "GIF", "TIFF", "WEBP"):
        buf = io.BytesIO()
        img.save(buf, fmt)
        assert image.decode_shard_jpeg(image.process(buf.getvalue())).shape == (256, 256, 3), fmt


# --------------------------------------------------------------------------------------------
# EXIF orientation


def with_orientation(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg_bytes(img, exif=exif)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pil(orientation: int) -> None:
    data = with_orientation(natural_image(160, 120), orientation)
    assert image.jpeg_orientation(data) == orientation
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert np.array_equal(image.decode_rgb(data), expected)


def test_orientation_6_turns_the_image_clockwise() -> None:
    img = Image.new("RGB", (400, 300), GREY)
    ImageDraw.Draw(img).rectangle((0, 0, 49, 49), fill=RED)  # stored top-left
    rgb = image.decode_rgb(with_orientation(img, 6))
    assert rgb.shape == (400, 300, 3)  # portrait now
    assert near(rgb[10, -10], RED) and near(rgb[10, 10], GREY)  # displayed top-right


def test_big_endian_exif_and_orientation_through_pil_path() -> None:
    # A hand-made big-endian ("MM") EXIF block with orientation 8.
    tiff = b"MM\x00\x2a\x00\x00\x00\x08" + b"\x00\x01" + b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x08\x00\x00"
    data = jpeg_bytes(natural_image(160, 120), exif=b"Exif\x00\x00" + tiff + b"\x00\x00\x00\x00")
    assert image.jpeg_orientation(data) == 8
    assert image.decode_rgb(data).shape == (160, 120, 3)
    # CMYK goes through PIL: orientation still applied.
    cmyk = Image.new("CMYK", (160, 120), (0, 255, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    assert image.decode_rgb(jpeg_bytes(cmyk, exif=exif)).shape == (160, 120, 3)


def test_pil_fallback_when_turbojpeg_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """What TurboJPEG can't decode (12-bit, lossless...) goes to PIL, orientation applied once."""
    data = with_orientation(natural_image(160, 120), 6)
    expected = image.decode_rgb(data)

    def unsupported(*args, **kwargs):
        raise ValueError("Unsupported JPEG data precision 12")

    monkeypatch.setattr(image.simplejpeg, "decode_jpeg", unsupported)
    rgb = image.decode_rgb(data)
    assert rgb.shape == (160, 120, 3) and psnr(rgb, expected) > 40
    with pytest.raises(BadImage, match=r"^truncated JPEG$"):
        image.decode_rgb(data[: len(data) // 2])  # PIL can't either: still a clear reason


def test_corrupt_exif_is_ignored() -> None:
    data = jpeg_bytes(natural_image(160, 120), exif=b"Exif\x00\x00MM\x00\x2a\xff\xff\xff\xff")
    assert image.jpeg_orientation(data) == 1
    assert image.decode_rgb(data).shape == (120, 160, 3)


# --------------------------------------------------------------------------------------------
# Bad files


def reason(data: bytes) -> str:
    with pytest.raises(BadImage) as info:
        image.process(data)
    return str(info.value)


def test_bad_files_get_distinct_clear_reasons() -> None:
    good = jpeg_bytes(natural_image(320, 240))
    reasons = {
        "truncated": reason(good[: len(good) // 2]),
        "empty": reason(b""),
        "random": reason(np.random.default_rng(1).bytes(5000)),
        "text": reason(b"n01440764 tench, Tinca tinca\n" * 20),
    }
    assert reasons == {
        "truncated": "truncated JPEG",
        "empty": "empty file",
        "random": "not an image (unrecognised format)",
        "text": "not an image (text file)",
    }
    assert reason(b"<!DOCTYPE html><html><body>Not Found</body></html>") == "not an image (HTML page)"
    assert reason(good[:200]) == "truncated JPEG"  # cut inside the headers
    png = png_bytes(natural_image(320, 240))
    assert reason(png[: len(png) // 2]) == "truncated PNG"


def test_recoverable_jpeg_damage_is_accepted() -> None:
    good = jpeg_bytes(natural_image(320, 240))
    end_of_app0 = 4 + int.from_bytes(good[4:6], "big")
    damaged = good[:end_of_app0] + b"\x00\x00" + good[end_of_app0:]  # "2 extraneous bytes before marker"
    assert np.array_equal(image.decode_rgb(damaged), image.decode_rgb(good))
    middle_of_scan = (good.index(b"\xff\xda") + len(good)) // 2
    damaged = good[:middle_of_scan] + b"\xff\xd3" + good[middle_of_scan:]  # "premature end of data segment"
    assert image.decode_rgb(damaged).shape == (240, 320, 3)


def test_corrupted_files_raise_bad_image_or_decode() -> None:
    """Random damage anywhere in a JPEG or PNG: never another exception type."""
    rng = np.random.default_rng(7)
    sources = [jpeg_bytes(natural_image(200, 150)), png_bytes(natural_image(120, 90))]
    outcomes = set()
    for source in sources:
        for _ in range(40):
            data = bytearray(source)
            for pos in rng.integers(0, len(data), int(rng.integers(1, 6))):
                data[pos] = int(rng.integers(0, 256))
            if rng.random() < 0.3:
                data = data[: int(rng.integers(1, len(data)))]
            try:
                out = image.process(bytes(data))
            except BadImage as e:
                outcomes.add("bad")
                assert str(e) and len(str(e)) < 120
            else:
                outcomes.add("ok")
                assert image.decode_shard_jpeg(out).shape == (256, 256, 3)
    assert outcomes == {"ok", "bad"}


def test_decode_shard_jpeg_round_trip_and_errors() -> None:
    out = image.process(jpeg_bytes(natural_image(500, 375)))
    rgb = image.decode_shard_jpeg(out)
    assert rgb.shape == (256, 256, 3) and rgb.dtype == np.uint8
    with pytest.raises(BadImage):
        image.decode_shard_jpeg(b"not a jpeg")


# --------------------------------------------------------------------------------------------
# The benchmark (smoke test: its numbers are for docs/BENCHMARKS.md, not for CI)


def test_bench_sources_are_deterministic(tmp_path) -> None:
    from preprocess import bench

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = [p.read_bytes() for p in bench.write_sources(tmp_path / "a", 3, seed=5)]
    second = [p.read_bytes() for p in bench.write_sources(tmp_path / "b", 3, seed=5)]
    assert first == second and all(d.startswith(b"\xff\xd8\xff") for d in first)


def test_bench_runs_and_writes_json(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from preprocess import bench

    out = tmp_path / "bench.json"
    assert bench.main(flags("--images 4 --workers 0 --repeat 1 --seed 1 --json {}", out)) == 0
    result = json.loads(out.read_text())
    names = [r["name"] for r in result["single_core"]]
    assert names == ["baseline (naive PIL)", "ours (image.process)", "bare full decode"]
    assert result["single_core"][1]["psnr_db"] > 30 and len(result["goals"]) == 3
    assert "ours / baseline" in capsys.readouterr().out
