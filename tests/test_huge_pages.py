"""Runtime, after a CPU backend loads: which memory goes onto 2 MiB pages, and that the kernel does it."""

from __future__ import annotations

import ctypes
import errno
import mmap
from pathlib import Path

import pytest

from llmpack.runtime.backends import huge_pages
from llmpack.runtime.backends.huge_pages import HUGE_PAGE, Region, back_with_huge_pages, filled_anonymous_regions

MiB = 2**20
SMAPS = """\
7f0000000000-7f0001000000 rw-p 00000000 00:00 0
Size:              16384 kB
Rss:               16000 kB
7f0001000000-7f0002000000 rw-p 00000000 00:00 0
Size:              16384 kB
Rss:                4096 kB
7f0002000000-7f0002400000 rw-p 00000000 00:00 0
Size:               4096 kB
Rss:                4096 kB
7f0003000000-7f0004000000 r--p 00000000 00:00 0
Size:              16384 kB
Rss:               16384 kB
7f0004000000-7f0005000000 rw-p 00000000 08:01 1234                       /data/model.onnx.data
Size:              16384 kB
Rss:               16384 kB
7f0005000000-7f0006000000 rw-s 00000000 00:01 99                         /dev/zero (deleted)
Size:              16384 kB
Rss:               16384 kB
55d000001000-55d000a01000 rw-p 00000000 00:00 0                          [heap]
Size:              10240 kB
Rss:               10240 kB
7ffd00000000-7ffd00a00000 rw-p 00000000 00:00 0                          [stack]
Size:              10240 kB
Rss:               10240 kB
"""


def test_only_big_filled_private_anonymous_memory_is_chosen():
    chosen = filled_anonymous_regions(SMAPS)
    # the filled 16 MiB anonymous mapping and the heap; not the one a quarter resident (collapsing would
    # fill it), the 4 MiB one, read-only, file-backed, shared or the stack
    assert [(r.start, r.end) for r in chosen] == [(0x7F0000000000, 0x7F0001000000), (0x55D000001000, 0x55D000A01000)]
    assert chosen[0].rss == 16000 * 1024


def test_only_whole_huge_pages_inside_a_region_are_asked_for():
    assert Region(0x55D000001000, 0x55D000A01000, 0).aligned == (0x55D000200000, 0x55D000A00000)
    assert Region(3 * HUGE_PAGE, 5 * HUGE_PAGE, 0).aligned == (3 * HUGE_PAGE, 5 * HUGE_PAGE)


def test_mappings_unchanged_since_before_the_load_are_left_alone(tmp_path, monkeypatch):
    smaps = tmp_path / "smaps"
    smaps.write_text(SMAPS)
    asked = []
    monkeypatch.setattr(huge_pages, "collapse_region", lambda libc, region: asked.append(region.start) or 8 * MiB)
    before = frozenset({(0x7F0000000000, 0x7F0001000000), (0x55D000001000, 0x55D000900000)})  # the heap grew since
    assert back_with_huge_pages(before, smaps) == 8 * MiB
    assert asked == [0x55D000001000]


def test_refusals_are_logged_not_raised(tmp_path, monkeypatch, caplog):
    smaps = tmp_path / "smaps"
    smaps.write_text(SMAPS)
    monkeypatch.setattr(huge_pages, "collapse_region", lambda libc, region: -errno.EINVAL)
    with caplog.at_level("INFO", logger="llmpack.runtime"):
        assert back_with_huge_pages(frozenset(), smaps) == 0
    assert "refused" in caplog.text and "EINVAL" in caplog.text


def _anon_huge_kib(address: int) -> int:
    """AnonHugePages of the mapping holding `address`, from this process's smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            inside = start <= address < end
        elif inside and fields[0] == "AnonHugePages:":
            return int(fields[1])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc/self/smaps")
def test_the_kernel_moves_a_filled_region_onto_huge_pages_with_its_contents():
    if huge_pages.thp_setting() == "never":
        pytest.skip("transparent huge pages are off on this host (THP 'never')")
    before = huge_pages.mapped_ranges()
    size = 16 * MiB
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    pattern = bytes(range(256)) * (size // 256)
    region[:] = pattern
    address = ctypes.addressof(ctypes.c_char.from_buffer(region))
    if _anon_huge_kib(address):
        pytest.skip("the region is on huge pages already (THP 'always'): nothing left to show")
    aligned = Region(address, address + size, size).aligned
    result = huge_pages.collapse_region(ctypes.CDLL(None, use_errno=True), Region(address, address + size, size))
    if result == -errno.EINVAL:
        pytest.skip("this kernel has no MADV_COLLAPSE (Linux < 6.1)")
    assert result == aligned[1] - aligned[0] >= 6 * MiB
    assert _anon_huge_kib(address) * 1024 == result
    assert region[:] == pattern
    assert back_with_huge_pages(before) >= 0  # the same region again: already huge, still no error


def test_the_cli_flag_reaches_the_backend_loader(demo_artifact, monkeypatch):
    from click.testing import CliRunner

    from llmpack.cli.serve_cli import main
    from llmpack.runtime import artifact

    calls = []
    monkeypatch.setattr(artifact, "back_with_huge_pages", lambda before: calls.append(before) or 0)
    request = '{"prompt": "hi", "raw": true, "max_tokens": 2}'
    for flags, expected in (([], 1), (["--no-huge-pages"], 1)):
        result = CliRunner().invoke(main, ["infer", str(demo_artifact), request, *flags])
        assert result.exit_code == 0, result.output
        assert len(calls) == expected
    assert calls[0]  # the mappings before the load, so that only the load's own memory is moved
