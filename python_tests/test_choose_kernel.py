"""choose_kernel (csrc/cuda/mla_decode/choose_kernel.h), the decode kernel choice of api.cpp, on
the host: native/choose_kernel_check.cpp is built here with the host compiler against csrc/ and
torch's headers and given calls (shapes, the kernel request, a device described as data). The GPU
tests run the kernels it picks; this one covers the choice on any machine."""
import subprocess

import pytest

from native_build import ROOT, build_native_check

FLOAT, INT8, FP8, INT4 = 0, 1, 2, 3  # traits.h FormatKind
SAME_DTYPE_KEYS, OTHER_DTYPE_KEYS, FP8_KEYS = 0, 1, 2  # traits.h RopePath
AUTO, MMA, WS = 0, 1, 2  # core/decode_kernel.h KernelRequest
H100 = dict(major=9, sms=132, optin=232448, per_sm=233472, sm90a=1)
A100 = dict(major=8, sms=108, optin=166912, per_sm=167936, sm90a=0)


@pytest.fixture(scope="module")
def checker(tmp_path_factory):
    return build_native_check("choose_kernel_check", tmp_path_factory.mktemp("choose"))


def choose(exe, calls):
    """One result per call: a dict of the spec, or {"error": message}."""
    lines = []
    for c in calls:
        dev = c["device"]
        lines.append(" ".join(str(x) for x in (
            c["D_c"], c["H"], c["H_kv"], c.get("d_r", 16), c.get("s_q", 1), c.get("B", 32),
            c.get("format", FLOAT), c.get("group", c["D_c"]), c.get("rope", SAME_DTYPE_KEYS),
            int(c.get("half", False)), c.get("request", AUTO), dev["major"], dev["sms"],
            dev["optin"], dev["per_sm"], dev["sm90a"])))
    run = subprocess.run([str(exe)], input="\n".join(lines) + "\n", capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    out = []
    for line in run.stdout.splitlines():
        if line.startswith("error "):
            out.append({"error": line[len("error "):]})
            continue
        f = line.split()
        spec = dict(family=f[0], variant=int(f[1]), tile=int(f[2]), rows_per_cta=int(f[3]),
                    row_chunks=int(f[4]), target_parts=int(f[5]), max_parts=int(f[6]),
                    smem=int(f[7]))
        spec.update({f[i]: int(f[i + 1]) for i in range(8, len(f), 2)})
        out.append(spec)
    assert len(out) == len(calls)
    return out


LLAMA3 = dict(D_c=256, H=32, H_kv=8)
LLAMA2 = dict(D_c=512, H=32, H_kv=32)


def test_llama3_takes_the_warp_specialized_kernel_on_hopper(checker):
    bf16, fp16, int8, int4 = choose(checker, [
        dict(LLAMA3, device=H100), dict(LLAMA3, device=H100, half=True),
        dict(LLAMA3, device=H100, format=INT8, group=64),
        dict(LLAMA3, device=H100, format=INT4, group=64)])
    for spec in (bf16, fp16, int8, int4):
        assert spec["family"] == "ws" and spec["tile"] == 64 and spec["shape"] == 4
        assert spec["steps"] == 2  # 8 query heads span 2 KV heads' 16-dim keys: 2 k16 steps
        # one CTA per SM, 32 rows a CTA: the plan aims at one wave
        assert spec["row_chunks"] == 1 and spec["target_parts"] == 132
        assert spec["max_parts"] == 132 + 32
    assert (bf16["half"], fp16["half"]) == (0, 1)
    assert (bf16["quant"], int8["quant"], int4["quant"]) == (0, 1, 1)
    assert len({s["variant"] for s in (bf16, fp16, int8)}) == 3


def test_the_mma_kernel_serves_everything_else(checker):
    llama2, fp8_keys, ampere, no_sm90a, forced, odd_heads = choose(checker, [
        dict(LLAMA2, device=H100),
        dict(LLAMA3, device=H100, rope=FP8_KEYS, format=INT4, group=64),
        dict(LLAMA3, device=A100),
        dict(LLAMA3, device=dict(H100, sm90a=0)),
        dict(LLAMA3, device=H100, request=MMA),
        dict(D_c=96, H=9, H_kv=3, d_r=12, device=H100)])
    for spec in (llama2, fp8_keys, ampere, no_sm90a, forced, odd_heads):
        assert spec["family"] == "mma"
    assert llama2["shape"] == 2 and llama2["tile"] == 32  # the D_c <= 512 bucket
    assert forced["shape"] == 1 and forced["tile"] == 32 and forced["quant"] == 0
    assert fp8_keys["quant"] == 1 and odd_heads["shape"] == 0
    # target parts: SMs x CTAs per SM (the check's occupancy model) / row chunks
    for spec, dev in ((forced, H100), (ampere, A100)):
        ctas = min(2, dev["per_sm"] // (spec["smem"] + 1024))
        assert spec["target_parts"] == dev["sms"] * ctas // spec["row_chunks"]
    assert forced["target_parts"] == 132 * 2  # two CTAs of the 256 bucket on an H100


def test_widest_bucket_and_row_chunks(checker):
    wide, many_rows = choose(checker, [dict(D_c=2048, H=32, H_kv=32, device=H100),
                                       dict(LLAMA3, s_q=8, device=H100, request=MMA)])
    assert wide["family"] == "mma" and wide["shape"] == 4 and wide["tile"] == 16
    assert many_rows["row_chunks"] == -(-8 * 32 // many_rows["rows_per_cta"])
    assert many_rows["rows_per_cta"] % 8 == 0 and many_rows["smem"] <= H100["optin"]


@pytest.mark.parametrize("call, why", [
    (dict(LLAMA3, rope=FP8_KEYS), "RoPE keys in q_lat's dtype"),
    (dict(LLAMA2), "D_c to be a multiple of 64 up to 256"),
    (dict(LLAMA3, d_r=12), "d_r to be a multiple of 16"),
    (dict(D_c=256, H=12, H_kv=4), "H to be a multiple of 8"),
    (dict(LLAMA3, format=INT8, group=4), "groups of a multiple of 8 channels"),
])
def test_a_forced_kernel_that_does_not_apply_names_why(checker, call, why):
    (spec,) = choose(checker, [dict(call, device=H100, request=WS)])
    assert "set to ws" in spec["error"] and why in spec["error"]


def test_forced_ws_needs_hopper_and_its_code(checker):
    ampere, no_code = choose(checker, [dict(LLAMA3, device=A100, request=WS),
                                       dict(LLAMA3, device=dict(H100, sm90a=0), request=WS)])
    assert "compute capability 9.0" in ampere["error"]
    assert "no sm_90a code" in no_code["error"]


def test_errors_of_shapes_no_kernel_takes(checker):
    too_wide, huge_batch = choose(checker, [dict(D_c=4096, H=8, H_kv=8, device=H100),
                                            dict(LLAMA3, B=60000, device=H100)])
    assert "D_c <= 2048, got D_c = 4096" in too_wide["error"]
    assert "batch 60000 is too large for the split-KV merge" in huge_batch["error"]


def test_every_compiled_variant_is_reachable(checker):
    # every (family, dtype, shape, steps, latent) of generate_kernels.py's list is what some call
    # gets: the table, the choice and the build cannot drift apart unnoticed
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "generate_kernels", ROOT / "csrc" / "cuda" / "mla_decode" / "generate_kernels.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    calls = []
    for _, family, dtype, shape, steps, quant in gen.KERNELS:
        half = dtype == "fp16"
        fmt = INT8 if quant else FLOAT
        if family == "mma":
            calls.append(dict(D_c=gen.MMA_BUCKET_WIDTHS[shape], H=8, H_kv=8, device=H100,
                              request=MMA, half=half, format=fmt, group=8))
        else:
            # MHA with d_r = 16 * steps: 8 query heads span 8 keys of 16 * steps dims... too wide;
            # one KV head whose key takes `steps` k16 steps instead
            calls.append(dict(D_c=64 * shape, H=8, H_kv=1, d_r=16 * steps, device=H100,
                              request=WS, half=half, format=fmt, group=8))
    got = choose(checker, calls)
    errors = [g["error"] for g in got if "error" in g]
    assert not errors, errors[:3]
    assert sorted(g["variant"] for g in got) == list(range(len(gen.KERNELS)))
