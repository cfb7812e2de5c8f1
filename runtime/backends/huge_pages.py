"""Runtime, right after a CPU backend has loaded its weights: move the big, filled anonymous
mappings (the weights ONNX Runtime prepacked, the KV buffers) onto 2 MiB transparent huge pages.

Why: a decode step streams every weight once, and with 4 KiB pages that is up to one TLB miss
(a two-level page walk inside a VM) per 4 KiB read; 2 MiB pages cover a 7B model's weights with ~2300
TLB entries. Measured with bench/huge_pages_ab.py (each process its own before/after, so the
per-process bandwidth of this VM cancels): Llama-2-7B-shape int4 1.12x, bench-110m int4 1.05x,
1.11x and 1.16x, bench-110m fp32 1.00x, 0.89x and 1.04x (noise: its control processes moved
0.94-1.14x).
Most hosts leave THP at `madvise`, so nothing is on huge pages unless the process asks;
MADV_COLLAPSE (Linux 6.1+) asks for memory that is already filled, so it works after ONNX Runtime
has allocated, with no environment variable to set before start-up. It copies: ~1 s per GB, once.
Anything that fails (older kernel, THP `never`, not Linux) leaves the memory as it was.
"""
from __future__ import annotations

import ctypes
import errno
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("llmpack.runtime")

HUGE_PAGE = 2 << 20
MIN_REGION = 8 << 20  # smaller mappings hold few whole huge pages and are not the weights
MIN_FILLED = 0.9  # collapse only what is (nearly) all resident: collapsing fills the holes
MADV_COLLAPSE = 25


def address_range(field: str) -> tuple[int, int]:
    """(start, end) from the "start-end" hex field that opens a /proc/<pid>/maps or smaps line."""
    start, end = field.split("-")
    return int(start, 16), int(end, 16)


@dataclass(frozen=True)
class Region:
    start: int
    end: int
    rss: int

    @property
    def aligned(self) -> tuple[int, int]:
        """The whole huge pages inside the mapping."""
        return -(-self.start // HUGE_PAGE) * HUGE_PAGE, self.end // HUGE_PAGE * HUGE_PAGE


def filled_anonymous_regions(smaps: str, min_bytes: int = MIN_REGION, min_filled: float = MIN_FILLED) -> list[Region]:
    """Private writable anonymous mappings (no file, or the heap) of at least `min_bytes` whose
    resident share is at least `min_filled`, from the text of /proc/<pid>/smaps."""
    regions, current = [], None
    for line in smaps.splitlines():
        fields = line.split()
        if not fields:
            continue
        if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
            current = None
            path = fields[5] if len(fields) > 5 else ""
            if fields[1].startswith("rw") and fields[1].endswith("p") and fields[4] == "0" and path in ("", "[heap]"):
                current = address_range(fields[0])
        elif fields[0] == "Rss:" and current is not None:
            start, end = current
            rss = int(fields[1]) * 1024
            if end - start >= min_bytes and rss >= min_filled * (end - start):
                regions.append(Region(start, end, rss))
            current = None
    return regions


def collapse_region(libc, region: Region) -> int:
    """Ask for huge pages on the region's whole huge pages; the bytes now backed by them (0 if refused)."""
    start, end = region.aligned
    if end <= start:
        return 0
    # MADV_COLLAPSE alone: no MADV_HUGEPAGE, so memory allocated later (and freed in pieces) is
    # left on 4 KiB pages as before and RSS does not grow in 2 MiB steps.
    if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_COLLAPSE) != 0:
        return -ctypes.get_errno()
    return end - start


def mapped_ranges(maps_path: Path = Path("/proc/self/maps")) -> frozenset[tuple[int, int]]:
    """(start, end) of every mapping of this process now: taken before a load, so that only what
    the load allocated (new mappings, or ones it grew, like the heap) is collapsed after it."""
    try:
        lines = maps_path.read_text().splitlines()
    except OSError:
        return frozenset()
    return frozenset(address_range(line.split(maxsplit=1)[0]) for line in lines if line)


def back_with_huge_pages(before: frozenset[tuple[int, int]] = frozenset(),
                         smaps_path: Path = Path("/proc/self/smaps")) -> int:
    """Collapse this process's big filled anonymous memory, except the mappings in `before`
    (unchanged since then), onto huge pages; the bytes collapsed."""
    try:
        smaps = smaps_path.read_text()
        libc = ctypes.CDLL(None, use_errno=True)
    except (OSError, AttributeError) as exc:
        log.debug("huge pages: not available here (%s)", exc)
        return 0
    collapsed, refused = 0, set()
    for region in filled_anonymous_regions(smaps):
        if (region.start, region.end) in before:
            continue
        result = collapse_region(libc, region)
        if result < 0:
            refused.add(errno.errorcode.get(-result, str(-result)))
        else:
            collapsed += result
    if refused:
        log.info("huge pages: the kernel refused some memory (%s); THP setting %s", ", ".join(sorted(refused)),
                 thp_setting())
    if collapsed:
        log.info("huge pages: %.0f MiB of weights and buffers on 2 MiB pages", collapsed / 2**20)
    return collapsed


def thp_setting(path: Path = Path("/sys/kernel/mm/transparent_hugepage/enabled")) -> str:
    """The bracketed word of the kernel's THP setting ("always", "madvise", "never"), or "unknown"."""
    try:
        text = path.read_text()
    except OSError:
        return "unknown"
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else "unknown"
