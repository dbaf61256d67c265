"""Numbers and text that used to take the server down a 500 path (issue 15's findings) now get a 400 that names the
field and the allowed range, and the server keeps serving."""

from __future__ import annotations

import requests

SMALL = dict(width=64, height=64, steps=2)


def post(server, route, **payload):
    return requests.post(f"{server.url}/sdapi/v1/{route}", json=payload, timeout=120)


def test_seeds_beyond_64_bits_are_refused_with_the_range(server):
    for field, label in (("seed", "Seed"), ("subseed", "Variation seed")):
        response = post(server, "txt2img", prompt="cat", **{field: 2**80}, **SMALL)
        assert response.status_code == 400, response.text
        assert f"{label} must be -1 (random) or between 0 and {2**63 - 1}" in response.json()["detail"]
    assert post(server, "txt2img", prompt="cat", seed=2**63 - 1, **SMALL).status_code == 200  # the top still works


def test_resize_seed_from_a_huge_size_is_refused(server):
    response = post(server, "txt2img", prompt="cat", seed_resize_from_w=10**6, seed_resize_from_h=64, **SMALL)
    assert response.status_code == 400 and "Resize seed from width must be between 64 and 2048" in response.text


def test_a_lone_surrogate_in_a_prompt_is_refused_with_its_position(server):
    for field, label in (("prompt", "Prompt"), ("negative_prompt", "Negative prompt")):
        response = post(server, "txt2img", **{"prompt": "cat", field: "a cat \ud800 sitting"}, **SMALL)
        assert response.status_code == 400, response.text
        detail = response.json()["detail"]
        assert detail.startswith(f"{label} contains a character that is not valid Unicode") and "position 6" in detail


def test_hypernetwork_widths_and_structures_that_cannot_fit_are_refused_before_allocating(server):
    cases = [
        (dict(enable_sizes=[-5, 768]), "Module widths must be between 1 and 4096"),
        (dict(enable_sizes=[10**9]), "Module widths must be between 1 and 4096"),
        (dict(enable_sizes=[4096], layer_structure="1, 1000, 1"), "parameters; the limit is 500,000,000"),
        (dict(enable_sizes=[768], layer_structure="1, nan, 1"), "must hold finite numbers"),
    ]
    for fields, message in cases:
        response = post(server, "create/hypernetwork", name="zqbig", **fields)
        assert response.status_code == 400, response.text
        assert message in response.json()["detail"]
    ok = post(server, "create/hypernetwork", name="zqsmall", enable_sizes=[32, 64], overwrite_old=True)
    assert ok.status_code == 200 and "zqsmall" in ok.json()["info"]
    assert post(server, "txt2img", prompt="cat", **SMALL).status_code == 200


def test_every_api_route_declares_its_error_answers_in_the_openapi_schema(server):
    """Clients generated from /openapi.json must know our 4xx answers and their body (`detail`)."""
    schema = requests.get(f"{server.url}/openapi.json", timeout=30).json()
    error = schema["components"]["schemas"]["ErrorResponse"]
    assert error["required"] == ["detail"] and "info" in error["properties"]
    routes = [
        (path, method, op)
        for path, ops in schema["paths"].items()
        if path.startswith("/sdapi/v1/")
        for method, op in ops.items()
    ]
    assert len(routes) >= 30
    for path, method, op in routes:
        for code in ("400", "404", "409"):
            ref = op["responses"][code]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith("/ErrorResponse"), (path, method, code)
        if "requestBody" in op:
            assert "422" in op["responses"], (path, method)
