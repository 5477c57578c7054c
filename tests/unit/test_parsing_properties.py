"""Property tests: any JSON a client can send is either valid params or a 400 that names
a field, never another exception."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zimage_server.core.errors import InvalidRequest
from zimage_server.images.openai_compat import parse_size, to_params
from zimage_server.protocol.segmind import GenerationParams, allowed_values, parse_params

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)
FIELDS = list(GenerationParams.model_fields)
bodies = st.dictionaries(st.sampled_from([*FIELDS, "extra"]), json_values, max_size=8)


# A loaded 2-core machine can be slow to generate examples: that is not a failure.
STEADY = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}


@settings(max_examples=300, derandomize=True, **STEADY)
@given(bodies)
def test_any_body_is_params_or_a_named_400(body: dict[str, object]) -> None:
    try:
        params = parse_params(json.dumps(body).encode())
    except InvalidRequest as error:
        assert error.field is None or error.field in FIELDS
        if error.field:
            assert (
                f"'{error.field}'" in error.message and allowed_values(error.field) in error.message
            )
        return
    assert isinstance(params.prompt, str) and params.prompt.strip()
    assert 256 <= params.width <= 2048 and 1 <= params.steps <= 75


@settings(max_examples=200, derandomize=True, **STEADY)
@given(
    # Lone surrogates are not text (the parser refuses them: test_protocol_edges).
    st.text(st.characters(exclude_categories=["Cs"]), min_size=1).filter(str.strip),
    st.integers(1, 75),
    st.integers(256, 2048),
    st.integers(256, 2048),
    st.sampled_from(["jpeg", "png", "webp"]),
    st.integers(-1, 2**63 - 1),
)
def test_valid_bodies_round_trip(
    prompt: str, steps: int, width: int, height: int, fmt: str, seed: int
) -> None:
    body = {
        "prompt": prompt,
        "steps": steps,
        "width": width,
        "height": height,
        "image_format": fmt,
        "seed": seed,
    }
    params = parse_params(json.dumps(body).encode())
    assert params.model_dump(include=set(body)) == body


@settings(max_examples=200, derandomize=True, **STEADY)
@given(st.integers(0, 5000), st.integers(0, 5000))
def test_sizes(width: int, height: int) -> None:
    size = f"{width}x{height}"
    if 256 <= width <= 2048 and 256 <= height <= 2048:
        assert parse_size(size) == (width, height)
    else:
        try:
            parse_size(size)
        except InvalidRequest as error:
            assert error.field == "size"
        else:
            raise AssertionError(size)


@settings(max_examples=200, derandomize=True, **STEADY)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "prompt",
                "n",
                "size",
                "seed",
                "response_format",
                "output_format",
                "output_compression",
            ]
        ),
        json_values,
    )
)
def test_openai_bodies_are_params_or_a_400(body: dict[str, object]) -> None:
    try:
        _, batch = to_params(body)
    except InvalidRequest:
        return
    except Exception as error:  # UnknownModel is a NotFound, also fine
        assert type(error).__name__ == "UnknownModel"
        return
    assert 1 <= len(batch) <= 4
