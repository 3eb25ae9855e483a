"""What a device can do at most, for the report's rooflines: datasheet peaks by device name, or the user's."""
from __future__ import annotations

import re

# Datasheet peaks, dense fp32 without tensor cores, and memory bandwidth: (pattern on the device name,
# label, TFLOP/s, GB/s). Not measured here: the report says so. First match wins.
PEAKS = [
    (r"\bH100\b.*\bNVL\b", "NVIDIA H100 NVL", 60.0, 3900.0),
    (r"\bH100\b.*\bPCIe\b", "NVIDIA H100 PCIe", 51.0, 2000.0),
    (r"\bH100\b", "NVIDIA H100 SXM", 67.0, 3350.0),
    (r"\bH200\b", "NVIDIA H200", 67.0, 4800.0),
    (r"\bA100\b.*\bPCIe\b.*80GB|\bA100 80GB PCIe\b", "NVIDIA A100 80GB PCIe", 19.5, 1935.0),
    (r"\bA100\b.*80GB", "NVIDIA A100 80GB SXM", 19.5, 2039.0),
    (r"\bA100\b", "NVIDIA A100 40GB", 19.5, 1555.0),
    (r"\bL40S\b", "NVIDIA L40S", 91.6, 864.0),
    (r"\bL4\b", "NVIDIA L4", 30.3, 300.0),
    (r"\bA10\b", "NVIDIA A10", 31.2, 600.0),
    (r"RTX 4090", "NVIDIA GeForce RTX 4090", 82.6, 1008.0),
    (r"RTX 3090", "NVIDIA GeForce RTX 3090", 35.6, 936.0),
    (r"\bV100\b", "NVIDIA V100 SXM2", 15.7, 900.0),
    (r"\bT4\b", "NVIDIA T4", 8.1, 320.0),
]


def peak_for(device_name: str, tflops: float | None = None, gbs: float | None = None) -> dict | None:
    """{"tflops", "gbs", "source"} from the datasheet table and/or the user's figures; None if neither."""
    _, label, sheet_tflops, sheet_gbs = next((r for r in PEAKS if re.search(r[0], device_name, re.IGNORECASE)),
                                             (None, None, None, None))
    given = [f"--peak-{k} {v:g}" for k, v in (("tflops", tflops), ("gbs", gbs)) if v is not None]
    if label is None and not given:
        return None
    sources = [f"datasheet values for {label}" if label and len(given) < 2 else "",
               f"given on the command line ({', '.join(given)})" if given else ""]
    return {"tflops": tflops if tflops is not None else sheet_tflops,
            "gbs": gbs if gbs is not None else sheet_gbs, "source": "; ".join(filter(None, sources))}


def roofline_us(flops: float | None, nbytes: float | None, peak: dict | None) -> float | None:
    """Lower bound on the time: the compute term or the memory term (each byte moved once), whichever is larger."""
    if peak is None:
        return None
    terms = [flops / (peak["tflops"] * 1e12) if flops and peak["tflops"] else None,
             nbytes / (peak["gbs"] * 1e9) if nbytes and peak["gbs"] else None]
    terms = [t for t in terms if t is not None]
    return 1e6 * max(terms) if terms else None
