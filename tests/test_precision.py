"""Device, precision and offload choices from A1111's flags (pure decisions, so they are testable without a GPU)."""

import pytest
import torch

from app.models.manager import choose_device, choose_dtypes, offload_mode
from app.settings import Settings, parse_credentials, settings_from_args

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("flags", "device", "expected"),
    [
        ({}, CPU, (torch.float32, torch.float32)),
        ({}, CUDA, (torch.float16, torch.float16)),
        ({"no_half": True}, CUDA, (torch.float32, torch.float32)),
        ({"no_half_vae": True}, CUDA, (torch.float16, torch.float32)),
        ({"precision": "full"}, CUDA, (torch.float32, torch.float32)),
        ({"precision": "half"}, CUDA, (torch.float16, torch.float16)),
    ],
)
def test_dtypes(flags, device, expected):
    assert choose_dtypes(Settings(**flags), device) == expected


def test_offload_modes():
    assert offload_mode(Settings(medvram=True), CUDA) == "model"
    assert offload_mode(Settings(lowvram=True), CUDA) == "sequential"
    assert offload_mode(Settings(lowvram=True), CPU) is None
    assert offload_mode(Settings(), CUDA) is None


def test_use_cpu_all_forces_the_cpu():
    assert choose_device(Settings(use_cpu=["all"])) == CPU


def test_flags_parse_with_a1111_names(tmp_path):
    s = settings_from_args(
        [
            "--data-dir",
            str(tmp_path),
            "--no-half-vae",
            "--precision",
            "full",
            "--listen",
            "--port",
            "9000",
            "--api-auth",
            "a:b",
            "--textual-inversion-templates-dir",
            str(tmp_path / "t"),
            "--hypernetwork-dir",
            str(tmp_path / "h"),
            "--nowebui",
        ]
    )
    assert s.no_half_vae and s.precision == "full" and s.host == "0.0.0.0" and s.effective_port == 9000
    assert s.templates_dir == tmp_path / "t" and s.hypernetwork_dir == tmp_path / "h"
    assert s.ckpt_dir == tmp_path / "models" / "Stable-diffusion"
    assert settings_from_args(["--nowebui", "--data-dir", str(tmp_path)]).effective_port == 7861
    with pytest.raises(ValueError, match="user:password"):
        parse_credentials("nocolon")


def test_a_negative_queue_limit_is_refused_by_the_flag_parser(capsys):
    with pytest.raises(SystemExit):
        settings_from_args(["--queue-limit", "-1"])
    assert "--queue-limit: must be 0 or more, got -1" in capsys.readouterr().err
    assert settings_from_args(["--queue-limit", "0"]).queue_limit == 0
