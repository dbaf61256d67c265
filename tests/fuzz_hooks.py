"""schemathesis hooks for tests/test_api_fuzz.py (loaded through SCHEMATHESIS_HOOKS in the fuzzer's process).

A generated request that leaves out a size or step count gets the server's A1111 default (512 px, 50 steps): fine
for a user, minutes per request on a CI machine's CPU. Fill the costly fields a case left out with cheap values;
a case that set them (in range or not) is sent as generated."""

from __future__ import annotations

import schemathesis

TRAINING = {"steps": 2, "training_width": 64, "training_height": 64, "create_image_every": 0}
CHEAP = {
    "/sdapi/v1/txt2img": {"width": 64, "height": 64, "steps": 2},
    "/sdapi/v1/train/embedding": TRAINING,
    "/sdapi/v1/train/hypernetwork": TRAINING,
    "/sdapi/v1/train/lora": TRAINING,
    "/sdapi/v1/preprocess": {"process_width": 64, "process_height": 64},
}


@schemathesis.hook
def map_case(context, case):
    defaults = CHEAP.get(case.operation.path)
    if defaults and isinstance(case.body, dict):
        for key, value in defaults.items():
            case.body.setdefault(key, value)
    return case
