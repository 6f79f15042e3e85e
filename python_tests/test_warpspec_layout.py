"""The warp-specialized decode kernel's shared-memory layouts, checked on the host: the layout
configure_warpspec takes for every shape its host side accepts places its regions disjoint,
aligned and inside the allocation (native/warpspec_layout_check.cpp, built here with the host
compiler against csrc/ and torch's headers). The GPU tests run the kernel; this one covers every
shape, GPU or not."""
import re
import subprocess

import pytest

from native_build import build_native_check


@pytest.fixture(scope="module")
def layout_report(tmp_path_factory):
    exe = build_native_check("warpspec_layout_check", tmp_path_factory.mktemp("layout"))
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    return run.returncode, run.stdout


def test_every_layout_is_disjoint_aligned_and_inside(layout_report):
    rc, out = layout_report
    bad = [line for line in out.splitlines() if line.startswith("BAD")]
    assert rc == 0 and not bad, "\n".join(bad[:20])
    checked, fit = map(int, re.search(r"checked (\d+) fit (\d+) bad 0", out).groups())
    assert fit > checked // 2  # most shapes fit: the check is not vacuous


def picks(out: str) -> dict[str, str]:
    return dict(re.findall(r"^PICK (\w+) (.+)$", out, flags=re.M))


def test_the_target_shapes_get_the_slots_documented(layout_report):
    # docs/ARCHITECTURE.md: three 48 KB slots for Llama-3's bf16 cache; three 16-bit slots and as
    # many stored ones as fit for its quantized caches; Llama-2's 128 KB tiles fit once: no layout
    p = picks(layout_report[1])
    assert p["llama3_bf16"].startswith("slots 3 ")
    assert p["llama3_int8"].startswith("slots 3 ") and "raw_slots 2 " in p["llama3_int8"]
    assert p["llama3_int4"].startswith("slots 3 ") and "raw_slots 4 " in p["llama3_int4"]
    assert p["llama2_bf16"] == "none"
