"""compute-sanitizer (memcheck and racecheck) over mla_decode at small sizes.

  python bench/sanitize_decode.py            # runs both tools over this script's --inner mode
  python bench/sanitize_decode.py --inner    # the workload alone

Covers every latent format, fp8 RoPE keys, s_q > 1, an empty and a mid-block sequence, split
sequences (LSE merge), each latent-width bucket and the warp-specialized kernel.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def workload():
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "python_tests"))
    import torch
    from test_ops_mla_decode import DecodeParam, make_inputs

    from mla_ext import ops

    cases = []
    dtypes = (torch.bfloat16, torch.float8_e4m3fn, torch.int8, torch.uint8)
    shapes = ((24, 9, 3), (200, 32, 8), (512, 16, 16), (1000, 8, 2), (2048, 16, 4))
    for i, (D_c, H, H_kv) in enumerate(shapes):
        dt = dtypes[i % len(dtypes)]
        cases.append(DecodeParam(3, 2, H, H_kv, 16, D_c, 16, (0, 37, 700), dt,
                                 torch.float8_e4m3fn if i % 2 else torch.bfloat16,
                                 torch.bfloat16, 8, seed=D_c))
    # the warp-specialized Hopper kernel (the default for these on an H200): GQA and MHA
    for D_c, H, H_kv in ((256, 32, 8), (128, 16, 16)):
        cases.append(DecodeParam(3, 2, H, H_kv, 16, D_c, 16, (0, 37, 700), torch.bfloat16,
                                 torch.bfloat16, torch.bfloat16, D_c, seed=D_c + 1))
    # and its quantized-latent producer: stored tiles by 16-token pieces and by whole pages
    for dt, block in ((torch.int8, 16), (torch.uint8, 64)):
        cases.append(DecodeParam(3, 2, 32, 8, 16, 256, block, (0, 37, 700), dt, torch.bfloat16,
                                 torch.bfloat16, 64, seed=block))
    for p in cases:
        args, _ = make_inputs(p, "cuda")
        ops.mla_decode(*args)
    torch.cuda.synchronize()
    print(f"ran {len(cases)} mla_decode calls")


def main():
    if "--inner" in sys.argv:
        workload()
        return
    failed = False
    for tool in ("memcheck", "racecheck"):
        cmd = ["compute-sanitizer", f"--tool={tool}", "--error-exitcode=3",
               sys.executable, __file__, "--inner"]
        print("$", " ".join(cmd), flush=True)
        rc = subprocess.run(cmd).returncode
        print(f"{tool}: {'clean' if rc == 0 else f'FAILED (exit {rc})'}", flush=True)
        failed |= rc != 0
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
