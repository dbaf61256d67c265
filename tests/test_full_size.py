"""Full-size SD1.5, SD2.1 and SDXL key/shape sets (zeros in fp16, written to a temp dir) are detected and load into
the right architecture offline. Marked slow: about a minute and ~7 GB of disk for SDXL."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from app.models.ldm_export import export_sd1, export_sd2, export_sdxl, meta_pipeline
from app.models.single_file import CONFIG_DIR, check_checkpoint, load_single_file

pytestmark = pytest.mark.slow

CASES = {
    "sd1": (export_sd1, "v1-5-pruned-emaonly.safetensors", 860, "StableDiffusionPipeline"),
    "sd2": (export_sd2, "v2-1_768-ema-pruned.safetensors", 866, "StableDiffusionPipeline"),
    "sdxl": (export_sdxl, "sd_xl_base_1.0.safetensors", 2567, "StableDiffusionXLPipeline"),
}


def zeros_checkpoint(config: str, export, path) -> None:
    shapes = {k: v.shape for k, v in export(meta_pipeline(CONFIG_DIR / config)).items()}
    save_file({k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()}, str(path))


@pytest.mark.parametrize("config", list(CASES))
def test_full_size_checkpoint_loads_into_its_architecture(tmp_path, config):
    export, name, unet_millions, pipeline = CASES[config]
    path = tmp_path / name
    zeros_checkpoint(config, export, path)
    assert check_checkpoint(path).name == config
    pipe = load_single_file(path, torch.float16)  # fp16: the file's tensors are used as they are
    try:
        assert type(pipe).__name__ == pipeline
        assert round(sum(p.numel() for p in pipe.unet.parameters()) / 1e6) == unet_millions
        assert pipe.unet.config.cross_attention_dim == {"sd1": 768, "sd2": 1024, "sdxl": 2048}[config]
    finally:
        del pipe
        path.unlink()
