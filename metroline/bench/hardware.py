"""What the machine can do: memory bandwidth, matmul throughput, and the decode roofline."""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(device: str | torch.device = "cpu", nbytes: int = 1 << 30, repeats: int = 7) -> float:
    """Read bandwidth in bytes/s: a torch sum over `nbytes` of fp32 (median of `repeats`)."""
    device = torch.device(device)
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    x.sum()
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        x.sum()
        _sync(device)
        times.append(time.perf_counter() - t)
    del x
    return nbytes / statistics.median(times)


def measure_matmul_flops(device: str | torch.device = "cpu", n: int = 1024, dtype=torch.float32,
                         repeats: int = 5) -> float:
    """Dense matmul throughput in FLOP/s (median of `repeats`)."""
    device = torch.device(device)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times)


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes a decode step must stream: every matmul weight once (the embedding table is only
    gathered, one row per token, unless it is tied to the output projection)."""
    total = 0
    seen = set()
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            w = mod.weight
            if id(w) not in seen:
                seen.add(id(w))
                total += w.numel() * w.element_size()
                if mod.bias is not None:
                    total += mod.bias.numel() * mod.bias.element_size()
    return total


def decode_roofline(bandwidth: float, bytes_per_token: int, flops: float, flops_per_token: float) -> dict:
    """Batch-1 decode ceiling from bandwidth, and the batch size at which compute takes over."""
    return {
        "decode_ceiling_tok_s": bandwidth / bytes_per_token,
        "compute_bound_batch": (flops / flops_per_token) / (bandwidth / bytes_per_token),
    }
