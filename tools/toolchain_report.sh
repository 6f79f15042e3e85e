#!/usr/bin/env bash
# What the extension was built with and what the process loads: compilers, the C++ runtimes
# mapped into a Python that imported mla_ext, and whether a C++ argument check that formats
# numbers into its message raises cleanly (it crashed once on the H200 image).
PY=${PYTHON:-python3}
for c in cc c++ g++ gcc; do printf '%s: ' "$c"; (command -v "$c" && "$c" --version | head -1) || echo none; done
echo "CC=${CC:-} CXX=${CXX:-}"
$PY - <<'PYEOF'
import sysconfig, torch
print("python CXX:", sysconfig.get_config_var("CXX"), "| torch", torch.__version__,
      "cxx11 abi", torch._C._GLIBCXX_USE_CXX11_ABI)
import mla_ext, mla_ext._C as C
print("extension:", C.__file__)
maps = open("/proc/self/maps").read().split("\n")
print("C++ runtimes mapped:", sorted({l.split()[-1] for l in maps if "libstdc++" in l or "libc++" in l}))
import subprocess
print(subprocess.run(["ldd", C.__file__], capture_output=True, text=True).stdout)
import faulthandler; faulthandler.enable()
q = torch.zeros(1, 1, 2, 16, dtype=torch.float32)
try:
    torch.ops.mla_ext.partial_rope(torch.zeros(3, 2, 8), torch.zeros(2, 2, 4), torch.zeros(2, 2, 4))
except Exception as e:  # a shape error whose message formats numbers
    print("formatted C++ error raised cleanly:", type(e).__name__, str(e).splitlines()[0][:160])
PYEOF
