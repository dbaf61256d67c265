"""Numbers and text that used to take the server down a 500 path (issue 15's findings) now get a 400 that names the
field and the allowed range, and the server keeps serving."""

from __future__ import annotations

import math
import re

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
    assert response.status_code == 400, response.text
    assert "Resize seed from width must be -1 (off) or between 64 and 2048" in response.json()["detail"]


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


def violations(prop: dict) -> list:
    """Values just outside a property's declared bounds (a list for an array of bounded numbers)."""
    if prop.get("type") == "array":
        return [[value] for value in violations(prop["items"])]
    # FastAPI writes every bound as a float (2**63 - 1 as 9.22e18); an optional integer is an anyOf with null
    whole = prop.get("type") == "integer" or any(option.get("type") == "integer" for option in prop.get("anyOf", []))
    step = 1 if whole else 0.5
    out = []
    if "maximum" in prop:
        out.append(prop["maximum"] + step)
    if "exclusiveMaximum" in prop:
        out.append(prop["exclusiveMaximum"])
    if "minimum" in prop:
        out.append(prop["minimum"] - step)
    if "exclusiveMinimum" in prop:
        out.append(prop["exclusiveMinimum"])
    return [int(v) if whole else v for v in out]


def names_a_limit(detail: str, limits: list[float]) -> bool:
    numbers = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", detail)]
    return any(math.isclose(n, limit, rel_tol=1e-9) for n in numbers for limit in limits)


def route_bodies(server, tmp_path):
    """(route, a cheap valid body, the body's schema properties) of each POST route that takes numbers and text.
    Training bodies name a folder without images: every field is checked before that refuses them."""
    schema = requests.get(f"{server.url}/openapi.json", timeout=30).json()
    train = dict(data_root=str(tmp_path), steps=2, training_width=64, training_height=64, learn_rate="0.001")
    bases = {
        "txt2img": dict(prompt="cat", **SMALL),
        "train/embedding": dict(embedding_name="zqbounds", **train),
        "train/hypernetwork": dict(hypernetwork_name="zqboundshn", **train),
        "train/lora": dict(lora_name="zqboundslora", **train),
        "create/embedding": dict(name="zqboundsb"),
        "create/hypernetwork": dict(name="zqboundsc", enable_sizes=[32]),
        "preprocess": dict(process_src=str(tmp_path), process_dst=f"{tmp_path}-out"),
        "extract/lora": dict(model_tuned="shapes-64", lora_name="zqboundsx"),
        "merge/lora": dict(loras="<lora:zqnone:1>", name="zqboundsm"),
        "merge/checkpoint": dict(primary_model_name="shapes-64", secondary_model_name="zqnone"),
    }
    for route, base in bases.items():
        ref = schema["paths"][f"/sdapi/v1/{route}"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        yield route, base, schema["components"]["schemas"][ref["$ref"].rsplit("/", 1)[1]]["properties"]


def is_text(prop: dict) -> bool:
    return prop.get("type") == "string" or any(option.get("type") == "string" for option in prop.get("anyOf", []))


def test_a_nul_byte_in_any_text_field_is_never_a_server_error(server, tmp_path):
    """JSON may carry U+0000, and Python's paths refuse it (ValueError): a folder field once answered 500. Every
    text field of every route, with a NUL inside, gets an answer that is not a 5xx."""
    assert post(server, "create/embedding", name="zqbounds", overwrite_old=True).ok
    assert post(server, "create/hypernetwork", name="zqboundshn", enable_sizes=[32, 64], overwrite_old=True).ok
    checked = 0
    for route, base, props in route_bodies(server, tmp_path):
        for name, prop in props.items():
            if not is_text(prop):
                continue
            answer = post(server, route, **{**base, name: "zq\x00nul"})
            assert answer.status_code < 500, (route, name, answer.text)
            if answer.status_code == 400:
                assert answer.json()["detail"], (route, name)
            checked += 1
    assert checked >= 40
    assert post(server, "txt2img", prompt="cat", **SMALL).status_code == 200  # and it keeps serving


def test_every_declared_bound_is_enforced_with_a_400_naming_the_field_and_the_range(server, tmp_path):
    """The schema's numeric bounds are the services' own: a value just outside each one is refused with a 400 whose
    `field` is that property and whose message gives the limit."""
    assert post(server, "create/embedding", name="zqbounds", overwrite_old=True).ok
    assert post(server, "create/hypernetwork", name="zqboundshn", enable_sizes=[32, 64], overwrite_old=True).ok
    checked = 0
    for route, base, props in route_bodies(server, tmp_path):
        for name, prop in props.items():
            for value in violations(prop):
                body = {**base, name: value}
                if name.startswith("hr_") or name == "denoising_strength":
                    body.update(enable_hr=True, hr_upscaler="Latent")
                if name.startswith("preview_"):
                    body["preview_from_txt2img"] = True
                answer = post(server, route, **body)
                assert answer.status_code == 400, (route, name, value, answer.text)
                error = answer.json()
                assert error["field"] == name, (route, name, value, error)
                limits = [prop.get(k) for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")]
                limits += [prop.get("items", {}).get(k) for k in ("minimum", "maximum")]
                assert names_a_limit(error["detail"], [x for x in limits if x is not None]), error
                checked += 1
    assert checked >= 40
    assert post(server, "txt2img", prompt="cat", **SMALL).status_code == 200  # and it keeps serving
