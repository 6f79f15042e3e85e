"""tools/ncu_sass_summary.py on a small hand-written ncu --page source CSV."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "ncu_sass_summary.py"

HEADER = ('"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed"\n')
# a loop body (3 lines run 100 times) between two lines run once
BODY = [("0x00", "MOV R1, c[0x0][0x28]", 5, 1), ("0x10", "@P0 IMAD R2, R3, R4, RZ", 30, 100),
        ("0x20", "HMMA.16816.F32 R4, R8, R12, R4", 50, 100), ("0x30", "BRA 0x10", 10, 100),
        ("0x40", "EXIT", 5, 1)]


def test_mix_and_regions(tmp_path):
    csv = tmp_path / "source.csv"
    csv.write_text('"Kernel Name","k"\n' + HEADER + "".join(
        f'"{a}","{src}","{s}","{n:,}"\n' for a, src, s, n in BODY))
    result = subprocess.run([sys.executable, str(SCRIPT), str(csv)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "5 SASS instructions, 302 warp instructions executed, 100 stall samples" in out
    mix = {line.split()[0]: line.split()[1:] for line in out.splitlines()
           if line[:1].isalpha() and len(line.split()) == 3}
    assert mix["HMMA"] == ["33.1", "50.0"]  # 100 of 302 instructions, 50 of 100 samples
    assert mix["IMAD"] == ["33.1", "30.0"]  # the predicate is not the opcode
    regions = out.split("regions of")[1].splitlines()[2:]
    assert [r.split()[:5] for r in regions] == [["1", "3", "100", "99.3", "90.0"]]


def test_csv_without_the_source_page(tmp_path):
    csv = tmp_path / "details.csv"
    csv.write_text('"ID","Metric Name"\n"0","Duration"\n')
    result = subprocess.run([sys.executable, str(SCRIPT), str(csv)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0 and "--page source" in result.stderr


def test_two_launches_and_stall_reasons(tmp_path):
    # ncu -c 2: one "Kernel Name" line and one table per launch; --kernel picks one.
    header = HEADER.rstrip("\n") + ',"stall_barrier","stall_wait","stall_wait (Not Issued)"\n'
    rows = [("0x00", "BAR.SYNC 0x0", 10, 4, 8, 2, 1), ("0x10", "FADD R1, R2, R3", 30, 4, 0, 30, 9)]
    table = "".join(f'"{a}","{src}","{s}","{n}","{b}","{w}","{wn}"\n'
                    for a, src, s, n, b, w, wn in rows)
    csv = tmp_path / "two.csv"
    csv.write_text('"Kernel Name","first"\n' + header + table + '"Kernel Name","second"\n'
                   + header + table.replace('"4"', '"7"'))
    out = {}
    for k in (0, 1):
        result = subprocess.run([sys.executable, str(SCRIPT), str(csv), "--kernel", str(k)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        out[k] = result.stdout
    assert '"first"' in out[0] and "8 warp instructions executed" in out[0]
    assert '"second"' in out[1] and "14 warp instructions executed" in out[1]
    assert "stall reasons (% of samples): wait 80.0, barrier 20.0" in out[0]
    bad = subprocess.run([sys.executable, str(SCRIPT), str(csv), "--kernel", "2"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "holds 2 launch(es)" in bad.stderr
