"""The client's optional shrinking: images at the encoder's scale, what it cannot improve sent as it is."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from postsim.bench.photos import EXIF_ORIENTATION_TAG, photo
from postsim.cli.main import app
from postsim.client.api import AsyncPostSimClient, PostSimClient, build_inputs
from postsim.client.posts import Post
from postsim.client.shrink import shrink_image
from postsim.model_repository.preprocessing import image_pixels


def phone_photo(orientation: int = 6) -> bytes:
    """A 4032×3024 JPEG stored sideways as a phone writes it, with the EXIF orientation that turns it upright."""
    picture = photo((3024, 4032), ((40, 90, 160), (200, 170, 120)), np.random.default_rng(2))
    picture.paste((255, 0, 0), (0, 0, 600, 600))  # top-left as displayed
    out = io.BytesIO()
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    picture.transpose(Image.Transpose.ROTATE_90).save(out, "JPEG", quality=90, exif=exif.tobytes())
    return out.getvalue()


def test_a_phone_photo_is_sent_upright_at_the_encoders_scale_in_a_fraction_of_the_bytes() -> None:
    original = phone_photo()
    shrunk = shrink_image(original)
    image = Image.open(io.BytesIO(shrunk))
    assert image.format == "JPEG" and image.size == (256, 341)
    assert len(shrunk) < len(original) / 20
    assert np.asarray(image)[5, 5].tolist() == pytest.approx([255, 0, 0], abs=30)  # upright: red stays top-left
    # What the encoder gets moves a little, not much.
    full, small = image_pixels(original), image_pixels(shrunk)
    assert float(np.corrcoef(full.ravel(), small.ravel())[0, 1]) > 0.99


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not an image at all",
        b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64,  # a video's opening: the server samples its frames
    ],
)
def test_what_is_not_a_decodable_image_is_sent_as_it_is(data: bytes) -> None:
    assert shrink_image(data) is data


def test_small_and_over_the_limit_images_are_sent_as_they_are() -> None:
    small = io.BytesIO()
    Image.new("RGB", (300, 256), (10, 20, 30)).save(small, "PNG")
    assert shrink_image(small.getvalue()) == small.getvalue()  # shorter side already 256
    huge = io.BytesIO()
    Image.new("L", (8000, 6000)).save(huge, "PNG")  # 48 MP: the server refuses it, and says so
    assert shrink_image(huge.getvalue()) == huge.getvalue()


def test_shrinking_is_off_by_default_and_a_setting_of_both_clients() -> None:
    with PostSimClient("localhost:1") as plain, PostSimClient("localhost:1", shrink_images=True) as shrinking:
        assert (plain.settings.shrink_images, shrinking.settings.shrink_images) == (False, True)
    assert AsyncPostSimClient("localhost:1", shrink_images=True).settings.shrink_images is True
    original = phone_photo()
    (sent, _) = build_inputs([Post(image=original)], shrink=True)
    (unchanged, _) = build_inputs([Post(image=original)])
    assert len(sent._get_content()) < len(unchanged._get_content()) / 20


@pytest.mark.integration
def test_shrunk_and_original_photos_embed_alike_through_the_server(grpc_url: str) -> None:
    original = phone_photo()
    post = Post(image=original, text="a walk by the lake at dusk")
    with PostSimClient(grpc_url) as plain, PostSimClient(grpc_url, shrink_images=True) as shrinking:
        (full,) = plain.embed([post])
        (small,) = shrinking.embed([post])
    assert full.frames == small.frames == 1
    assert float(np.dot(full.image_embedding, small.image_embedding)) > 0.99


@pytest.mark.integration
def test_the_commands_that_send_images_take_shrink_images(grpc_url: str, tmp_path: Path) -> None:
    runner = CliRunner()
    for command in (["embed"], ["similar"], ["index", "build"], ["index", "upsert"]):
        result = runner.invoke(app, [*command, "--help"], terminal_width=200)
        assert "--shrink-images" in result.output, command
    image = tmp_path / "phone.jpg"
    image.write_bytes(phone_photo())
    embeddings = []
    for flags in ([], ["--shrink-images"]):
        result = runner.invoke(app, ["embed", "--image", str(image), "--url", grpc_url, *flags])
        assert result.exit_code == 0, result.output
        embeddings.append(np.asarray(json.loads(result.output)["embedding"]))
    assert float(np.dot(*embeddings)) > 0.99
