"""How a v2 job's request is kept: images apart from the params row, and the hash of the
body as the client sent it."""

from __future__ import annotations

from zimage_server.jobs.stored import join_inputs, request_hash, split_inputs
from zimage_server.protocol import GenerationParams

PNG = "data:image/png;base64,iVBORw0KGgo="


def test_the_row_keeps_no_image_and_the_job_gets_them_back() -> None:
    params = GenerationParams(prompt="a fox", task="inpaint", image=PNG, mask_image=PNG)
    row, images = split_inputs(params)
    assert PNG not in row and images is not None
    assert join_inputs(row, images) == params


def test_text_to_image_and_rows_from_before_keep_everything_in_the_row() -> None:
    plain = GenerationParams(prompt="a fox")
    assert split_inputs(plain) == (plain.model_dump_json(), None)
    legacy = GenerationParams(prompt="a fox", task="img2img", image=PNG)
    assert join_inputs(legacy.model_dump_json(), None) == legacy


def test_the_hash_is_of_the_slug_and_the_json_not_its_key_order() -> None:
    body = {"prompt": "a fox", "image": "https://example.test/a.png", "strength": 0.5}
    same = request_hash("z-image-turbo-img2img", dict(reversed(body.items())))
    assert request_hash("z-image-turbo-img2img", body) == same
    assert request_hash("z-image-turbo-inpaint", body) != same
    assert request_hash("z-image-turbo-img2img", {**body, "strength": 0.6}) != same
