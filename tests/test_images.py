"""One opener for every image: quirks of real files handled, bad files refused in one line."""

import io

import numpy as np
import pytest
from PIL import Image

from toolkit.core.errors import ImageError
from toolkit.core.images import open_image, perceptual_hash, sha256_file, verify_images


@pytest.fixture
def photo(clothing_small):
    return next(iter(sorted((clothing_small / "train" / "shoes").iterdir())))


def test_shoe_pair_png_named_jpg_with_alpha_opens_as_rgb(shoe_pairs):
    path = sorted((shoe_pairs / "train").iterdir())[0]
    with Image.open(path) as raw:
        assert raw.format == "PNG" and path.suffix == ".jpg" and "A" in raw.mode
    img = open_image(path)
    assert img.mode == "RGB" and img.size == (224, 224)


def test_exif_rotated_photo_is_upright(tmp_path, photo):
    original = Image.open(photo).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    original.save(path, exif=exif)
    img = open_image(path)
    assert img.size == (original.height, original.width)


def test_modes_become_rgb(tmp_path, photo):
    base = Image.open(photo).convert("RGB").resize((64, 48))
    cmyk = tmp_path / "cmyk.jpg"
    base.convert("CMYK").save(cmyk)
    sixteen = tmp_path / "deep.png"
    Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20).save(sixteen)
    palette = tmp_path / "palette.png"
    pal = base.convert("P")
    pal.info["transparency"] = 0
    pal.save(palette, transparency=0)
    grey = tmp_path / "grey.png"
    base.convert("L").save(grey)
    for path in (cmyk, sixteen, palette, grey):
        img = open_image(path)
        assert img.mode == "RGB" and img.size == (64, 48), path
    assert np.asarray(open_image(cmyk)).mean() == pytest.approx(np.asarray(base).mean(), abs=12)


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (20, 10), c) for c in ("red", "blue")]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    img = open_image(path)
    assert img.size == (20, 10) and img.getpixel((5, 5))[0] > 200


@pytest.mark.parametrize("make, reason", [
    (lambda p, photo: p.write_bytes(b""), "empty file"),
    (lambda p, photo: p.write_text("this is not an image"), "not an image"),
    (lambda p, photo: p.write_bytes(photo.read_bytes()[:3000]), "truncated"),
])
def test_bad_files_are_one_line_errors_naming_the_file(tmp_path, photo, make, reason):
    path = tmp_path / "bad.jpg"
    make(path, photo)
    with pytest.raises(ImageError) as info:
        open_image(path)
    assert str(path) in str(info.value) and reason in str(info.value) and "\n" not in str(info.value)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(path)  # a few KB on disk, 400 megapixels declared
    assert path.stat().st_size < 200_000
    with pytest.raises(ImageError, match="pixel limit"):
        open_image(path)


def test_bytes_and_upload_names():
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "white").save(buffer, format="PNG")
    assert open_image(buffer.getvalue(), name="upload.png").size == (8, 8)
    with pytest.raises(ImageError, match="^upload.jpg: not an image"):
        open_image(b"<html></html>", name="upload.jpg")


def test_verify_lists_bad_files_and_modifies_nothing(tmp_path, photo):
    good = tmp_path / "good.jpg"
    good.write_bytes(photo.read_bytes())
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    (tmp_path / "cut.jpg").write_bytes(photo.read_bytes()[:2000])
    files = sorted(tmp_path.iterdir())
    before = {f: sha256_file(f) for f in files}
    ok, bad = verify_images(files)
    assert ok == [good]
    assert sorted(b.path.name for b in bad) == ["cut.jpg", "empty.jpg", "text.jpg"]
    assert {f: sha256_file(f) for f in sorted(tmp_path.iterdir())} == before


def test_perceptual_hash_survives_resizing(photo):
    img = open_image(photo)
    small = img.resize((img.width // 3, img.height // 3))
    import imagehash

    distance = imagehash.hex_to_hash(perceptual_hash(img)) - imagehash.hex_to_hash(perceptual_hash(small))
    assert distance <= 6
