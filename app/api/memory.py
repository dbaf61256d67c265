"""`GET /sdapi/v1/memory` in A1111's shape: process RAM from /proc, and torch's CUDA counters when present."""

from __future__ import annotations

import os
from typing import Any

import torch

from app.models.out_of_memory import system_memory


def _ram() -> dict[str, Any]:
    system = system_memory()
    if system is None:
        return {"error": "/proc/meminfo cannot be read here"}
    total, free = system
    try:
        with open(f"/proc/{os.getpid()}/statm", encoding="ascii") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError) as e:
        return {"error": str(e)}
    return {"free": free, "used": rss, "total": total}


def memory_report() -> dict[str, Any]:
    cuda: dict[str, Any] = {"error": "CUDA is not available"}
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        stats = torch.cuda.memory_stats()
        cuda = {
            "system": {"free": free, "used": total - free, "total": total},
            "active": {
                "current": stats.get("active_bytes.all.current", 0),
                "peak": stats.get("active_bytes.all.peak", 0),
            },
            "allocated": {
                "current": stats.get("allocated_bytes.all.current", 0),
                "peak": stats.get("allocated_bytes.all.peak", 0),
            },
            "reserved": {
                "current": stats.get("reserved_bytes.all.current", 0),
                "peak": stats.get("reserved_bytes.all.peak", 0),
            },
        }
    return {"ram": _ram(), "cuda": cuda}
