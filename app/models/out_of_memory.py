"""Running out of memory: recognised on any device, the memory given back at once, and an error that says what to
make smaller.

On the 6-12 GB GPUs our users have, "CUDA out of memory" is the error they meet most. Torch raises it as
`torch.OutOfMemoryError` (CUDA, XPU); the CPU allocator raises a plain RuntimeError ("can't allocate memory");
numpy and Python raise MemoryError. The exception's traceback holds the frames of the call that failed, and through
them every activation that call had made: an error kept anywhere (a finished job keeps its error) would keep that
memory, and the next request would run out too. So `guarded` drops the original exception, releases the memory, and
raises a fresh `OutOfMemoryError` (a UserError: HTTP 507, a message in the UI) that holds no tensors.
"""

from __future__ import annotations

import errno
import gc
import re
from collections.abc import Callable
from typing import TypeVar

import torch

from app.errors import UserError

T = TypeVar("T")
GB = 1024**3
_ASKED = re.compile(r"tried to allocate ([\d.]+ ?[KMGT]i?B|\d+ bytes)", re.IGNORECASE)


class OutOfMemoryError(UserError):
    """The work needed more memory than the device had free; `detail` is what ran out and by how much."""

    status_code = 507

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail or message


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an allocation failure, on whichever device."""
    if isinstance(error, torch.OutOfMemoryError | MemoryError):
        return True
    if isinstance(error, OSError):
        return error.errno == errno.ENOMEM
    if isinstance(error, RuntimeError):
        text = str(error)
        return (
            "can't allocate memory" in text  # torch's CPU allocator
            or "Cannot allocate memory" in text  # ENOMEM in words: e.g. mapping a .safetensors file
            or "out of memory" in text.lower()  # MPS, and CUDA builds that raise a plain RuntimeError
            # oneDNN (CPU convolutions) when it cannot allocate a kernel or its scratch space; a kernel it does not
            # support fails earlier, at "could not create a primitive descriptor"
            or text.strip() == "could not create a primitive"
        )
    return False


def release_memory(device: torch.device) -> None:
    """Free what the failed call left behind: reference cycles, and the CUDA allocator's cached blocks (which other
    processes, and fragmentation, would otherwise keep from us)."""
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _asked(error: BaseException) -> str:
    match = _ASKED.search(str(error))
    if match is None:
        return ""
    amount = match.group(1)
    if amount.endswith("bytes"):
        size = int(amount.split()[0])
        amount = f"{size / GB:.2f} GB" if size >= GB else f"{size / 1024**2:.0f} MB"
    return f"it tried to allocate {amount}"


def memory_state(device: torch.device) -> str:
    """How much memory the device has and how much is free, in words (after `release_memory`)."""
    if device.type == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(device)
        held = torch.cuda.memory_allocated(device)
        name = torch.cuda.get_device_name(device)
        state = (
            f"{name}: {total / GB:.1f} GB in all, {held / GB:.1f} GB held by the loaded model and this app, "
            f"{free / GB:.1f} GB free"
        )
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch >= 2.7
        if fraction is not None and fraction(device) < 1:
            state += f"; this process is limited to {total * fraction(device) / GB:.1f} GB"
        return state
    system = system_memory()
    parts = [
        f"system memory: {system[0] / GB:.1f} GB in all, {system[1] / GB:.1f} GB available"
        if system is not None
        else f"device: {device}"
    ]
    # A container's or a shell's limit is what runs out first there, and /proc/meminfo does not show it.
    limit = _process_limit()
    if limit is not None:
        parts.append(f"this process is limited to {limit / GB:.1f} GB")
    return "; ".join(parts)


def system_memory() -> tuple[int, int] | None:
    """(total, available) bytes of system memory from /proc/meminfo; None where there is none (not Linux)."""
    try:
        info = {}
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, value = line.split(":", 1)
                info[key] = int(value.split()[0]) * 1024
        return info["MemTotal"], info.get("MemAvailable", info["MemFree"])
    except (OSError, ValueError, KeyError):
        return None


def _rlimits() -> list[int]:
    """The soft data and address-space rlimits that are set (`ulimit -d`, `ulimit -v`), in bytes."""
    limits = []
    try:
        import resource  # not on Windows

        for which in (resource.RLIMIT_DATA, resource.RLIMIT_AS):
            soft = resource.getrlimit(which)[0]
            if soft != resource.RLIM_INFINITY:
                limits.append(soft)
    except (ImportError, OSError, ValueError):
        pass
    return limits


def allocation_can_fail(device: torch.device) -> bool:
    """Whether running out of memory on `device` is an error this process sees (and can recover from).

    CUDA's allocator raises one as soon as a request does not fit. In system memory Linux overcommits: with no
    rlimit, no allocation fails, and when memory runs out the kernel's OOM killer ends the process (a container's
    cgroup limit works the same way). Only a data or address-space rlimit makes the allocation itself fail there.
    Other devices are not assumed to fail cleanly (Apple's MPS shares system memory and may swap first)."""
    if device.type == "cpu":
        return bool(_rlimits())
    return device.type == "cuda"


def _process_limit() -> int | None:
    """The smallest of the cgroup v2 memory limit and the data / address-space rlimits, if any is set."""
    limits = _rlimits()
    try:
        with open("/proc/self/cgroup", encoding="ascii") as f:
            group = next((line.split("::", 1)[1].strip() for line in f if line.startswith("0::")), None)
        if group is not None:
            with open(f"/sys/fs/cgroup{group.rstrip('/')}/memory.max", encoding="ascii") as f:
                text = f.read().strip()
            if text.isdigit():  # "max": no limit
                limits.append(int(text))
    except (OSError, ValueError):
        pass
    return min(limits) if limits else None


def smaller_advice(device: torch.device, offload: str | None = None, training: bool = False) -> str:
    """What else frees memory: on CUDA the start-up flags that trade speed for it (`offload`: the one in use, as
    `manager.offload_mode` gives it; training keeps the whole model on the GPU whatever the flag), elsewhere the
    process's limit or the other programs."""
    if device.type == "cuda":
        if training or offload == "sequential":
            return "close other programs that use the GPU"
        if offload == "model":
            return "start the app with --lowvram (one layer at a time on the GPU: slower, least memory)"
        return "start the app with --medvram (or --lowvram) so that only the part in use sits on the GPU"
    if _process_limit() is not None:
        return "raise this process's memory limit (its container's, or the shell's ulimit)"
    return "close other programs that use a lot of memory"


def guarded(device: torch.device, work: Callable[[], T], doing: str = "", advice: str | Callable[[], str] = "") -> T:
    """`work()`, with running out of memory turned into an OutOfMemoryError after the memory is released: "Out of
    memory while <doing> (<what ran out>). <advice>". Other errors pass through unchanged. An `advice` that needs
    work (reading the flags, the process's limits) is given as a function: it runs only when memory ran out."""
    try:
        return work()
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        asked = _asked(e)
    # Here the original exception, its traceback and the frames that held the failed call's tensors are gone.
    release_memory(device)
    detail = "; ".join(part for part in (asked, memory_state(device)) if part)
    message = f"Out of memory{f' while {doing}' if doing else ''} ({detail})."
    advice = advice() if callable(advice) else advice
    if advice:
        message += f" {advice}"
    raise OutOfMemoryError(message, detail)
