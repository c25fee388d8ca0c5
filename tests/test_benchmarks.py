"""The GPU benchmark scripts keep running: each one at a tiny size on the CPU (their figures come from the GPU only,
docs/benchmarks.md; here only that they run and report what they should)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REFERENCE

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = ["--device", "cpu", "--frames", "5", "--height", "32", "--width", "32"]
SMALL = ["--device", "cpu", "--frames", "5", "--height", "16", "--width", "16"]  # for the scripts run many times over


def _run(script: str, *args: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{script}.json"
    subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{script}.py"), *args, "--out", str(out)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return json.loads(out.read_text())


def test_kernel_kinds() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    from common import kernel_kind

    kinds = {
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1": "attention forward",
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_3": "attention backward",
        "triton_poi_fused__scaled_dot_product_cudnn_attention__to_copy_stack_transpose_view_3": "other",
        "triton_tem_fused_mm_0": "gemm",
        "nvjet_sm90_tst_256x152_64x4_1x2_h_bz_coopA_bias_TNT": "gemm",
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize256x64x32": "convolution",
        "rms_norm_rows": "other",
        "void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<c10::BFloat16>>": "other",
    }
    assert {name: kernel_kind(name) for name in kinds} == kinds


@pytest.mark.parametrize(
    ("intervals", "busy", "span"),
    [
        ([], 0, 0),
        ([(2, 5)], 3, 3),
        ([(0, 4), (6, 7)], 5, 7),  # a gap of 2
        ([(0, 10), (2, 3), (4, 12)], 12, 12),  # overlapping streams count once
        ([(5, 6), (0, 2), (1, 3)], 4, 6),  # any order
    ],
)
def test_interval_union(intervals, busy: float, span: float) -> None:
    """common.interval_union: how long at least one kernel ran, and from the first start to the last end."""
    sys.path.insert(0, str(BENCHMARKS))
    from common import interval_union

    assert interval_union(intervals) == (busy, span)


def test_every_report_records_where_it_ran() -> None:
    """common.environment: date, device, torch, CUDA and cuDNN versions; the scripts' reports start with it."""
    import torch

    sys.path.insert(0, str(BENCHMARKS))
    from common import environment

    where = environment(torch.device("cpu"))
    assert where["device"] == "cpu" and where["torch"] == torch.__version__ and where["cuda"] == torch.version.cuda
    assert set(where) == {"date", "device", "torch", "cuda", "cudnn"}
    scripts = [p.stem for p in BENCHMARKS.glob("*.py") if "environment(" in p.read_text()]
    assert len(scripts) >= 12, scripts  # every GPU benchmark's report; encoders.py and cpu_load.py are CPU-only


def test_peak_allocations() -> None:
    """train_dit.py --memory: the allocator trace's peak and what is live there, grouped by the innermost frame in
    wanalpha, the benchmarks or generated code (the frames above it, e.g. torch's, do not name a group)."""
    sys.path.insert(0, str(BENCHMARKS))
    from common import peak_allocations

    here = {"filename": "/x/src/wanalpha/models/dit.py", "line": 7, "name": "forward"}
    torch_frame = {"filename": "/site-packages/torch/nn/modules/module.py", "line": 1, "name": "_call_impl"}

    def alloc(addr: int, gib: float, *frames: dict) -> dict:
        return {"action": "alloc", "addr": addr, "size": int(gib * 2**30), "frames": list(frames)}

    events = [
        alloc(1, 1, torch_frame, here),
        alloc(2, 2),
        {"action": "free_requested", "addr": 1, "size": 2**30},
        alloc(3, 0.5, here),
        {"action": "free_completed", "addr": 1, "size": 2**30},
        alloc(4, 1.25, here),
        {"action": "free_requested", "addr": 2, "size": 2 * 2**30},
        alloc(5, 1),
    ]
    report = peak_allocations(events, before=2**30)
    assert report["peak_gib"] == 1 + 2 + 0.5 + 1.25 and report["before_gib"] == 1 and report["events"] == 8
    assert report["at_peak"] == [
        {"where": "(no Python frame)", "gib": 2.0, "count": 1},
        {"where": "dit.py:7 forward", "gib": 1.75, "count": 2},
    ]


def test_vae_benchmark(tmp_path: Path) -> None:
    """Modes with levers, the before/after lever, the FLOP model and the profile. The bf16 mode only where the CPU
    computes bf16 natively: elsewhere (AVX2) PyTorch's bf16 3-D convolution runs 40× slower than float32's, minutes
    for the real VAE's channels even at 32 × 32."""
    import torch

    lossy = "bf16+cl" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32+cl+pytorch"
    args = ["--skip-parity", "--profile", "--repeat", "1", "--modes", "fp32", "fp32+cl+previous", lossy]
    report = _run("vae", *SMALL, "--reference", str(REFERENCE), *args, tmp_path=tmp_path)
    assert report["flops"]["encode"] > 0 and report["flops"]["decode"] > report["flops"]["encode"]
    timing = report["timing"]
    assert set(timing) == {"fp32", "fp32+cl+previous", lossy}
    previous = timing["fp32+cl+previous"]["decode_psnr_db_vs_fp32"]
    assert previous["rgb"] > 100 and previous["alpha"] > 100  # the previous forms compute the same values
    if lossy == "bf16+cl":
        assert 35 < timing["bf16+cl"]["decode_psnr_db_vs_fp32"]["rgb"] < 100
    else:  # the PyTorch forms compute the same values
        assert timing[lossy]["decode_psnr_db_vs_fp32"]["rgb"] > 100
    for result in timing.values():
        decode = result["profile"]["decode"]
        assert result["decode_tflops"] > 0 and decode["kernel_ms"] > 0
        assert 0 < decode["busy_ms"] <= decode["span_ms"] and 0 < result["decode_launch_s"] <= result["decode_s"]


def test_vae_benchmark_dual_vs_separate(tmp_path: Path) -> None:
    """--decode-only with the +dual lever: the decoders one after the other and as one batch of two, the same values
    (PSNR against the first mode), only the decode timed. (+serial, one CUDA stream, is the CPU's only form.) The
    rows count their heads' kernel calls (the default; not with +nofewhead): none off the GPU, where the convolution
    runs as before."""
    args = ["--skip-parity", "--decode-only", "--repeat", "1", "--modes", "fp32", "fp32+dual", "fp32+nofewhead"]
    timing = _run("vae", *SMALL, "--reference", str(REFERENCE), *args, tmp_path=tmp_path)["timing"]
    assert [r["decoders"] for r in timing.values()] == ["separate", "dual", "separate"]
    assert timing["fp32"]["head_kernel"] == {"calls": 0, "kernel": 0} and "head_kernel" not in timing["fp32+nofewhead"]
    assert timing["fp32+nofewhead"]["decode_psnr_db_vs_fp32"]["rgb"] == float("inf")
    assert not any(r["side_stream"] for r in timing.values())  # two CUDA streams on a GPU only
    dual = timing["fp32+dual"]
    assert dual["decode_psnr_db_vs_fp32"]["rgb"] > 100 and dual["decode_psnr_db_vs_fp32"]["alpha"] > 100
    assert all(r["decode_s"] > 0 and "encode_s" not in r for r in timing.values())


def test_vae_convs_benchmark(tmp_path: Path) -> None:
    """Every convolution shape of one decoder's decode (collected on the meta device: the first chunk's shapes with
    their zero frames, the later chunks' with cached ones, the upsamplings' in phases) timed with its share, and the
    FP8 emulation's PSNR rows:
    the float32 decode itself exact, FP8 convolutions lossy (the gate's figures come from the GPU)."""
    args = ["--repeat", "1", "--scalings", "channel", "--layers", "all", "full"]
    report = _run("vae_convs", *SMALL, "--reference", str(REFERENCE), *args, tmp_path=tmp_path)
    rows = report["shapes"]
    assert report["device"] == "cpu" and {"date", "torch", "cuda", "cudnn"} <= report.keys()
    assert abs(sum(r["share"] for r in rows) - 1) < 1e-9 and all(r["calls"] > 0 and r["ms"] > 0 for r in rows)
    full = [r for r in rows if r["weight"] == [96, 96, 3, 3, 3] and r["input"][-1] == 16]
    assert sorted(r["input"][2] for r in full) == [3, 6]  # the first chunk (1 frame + 2 zero frames), then 4 + 2
    # the last ×2 upsampling's convolution (192 → 96, 3 × 3 on 16 × 16) as the GPU runs it: 2 × 2, 4 × 96 outputs,
    # on the 8 × 8 frames before the upsampling (the first chunk's one frame, then four)
    phases = sorted(r["input"][0] for r in rows if r["weight"] == [384, 192, 2, 2] and r["input"][2:] == [8, 8])
    assert phases == [1, 4] and report["upsampling"] == "phases"
    assert not [r for r in rows if r["kind"] == "conv2d" and r["weight"][2:] == [3, 3]]  # no upsampled form left
    psnr = report["fp8_psnr_db"]
    assert set(psnr) == {"none/none", "channel/all", "channel/full"}
    assert psnr["none/none"]["rgb"] == float("inf")
    assert all(10 < v["rgb"] < 60 for k, v in psnr.items() if k != "none/none")


def test_encoders_benchmark(tmp_path: Path) -> None:
    """Each format written alone with frame and slice threads for video.FRAME_THREADED: timings, and the same
    packets either way for the frame-threaded ProRes (the setting changes its threading only). The H.264 alpha mp4
    is not frame-threaded by the setting, so both of its runs are one configuration; x264's own threads made its
    packets differ once in a CI run under load, so its comparison is reported, not asserted."""
    args = ["--frames", "9", "--height", "48", "--width", "64", "--formats", "mov", "alpha_mp4"]
    report = _run("encoders", *args, tmp_path=tmp_path)
    assert set(report["runs"]) == {f"{f}, {t} threads" for f in ("mov", "alpha_mp4") for t in ("frame", "slice")}
    assert all(r["wall_s"] > 0 and r["bytes"] > 0 for r in report["runs"].values())
    assert report["mov_same_packets"] and isinstance(report["alpha_mp4_same_packets"], bool)


def test_attention_benchmark(tmp_path: Path) -> None:
    report = _run(
        "attention", "--variants", "tiny", *TINY, "--repeat", "1", "--backends", "math", "fa4", tmp_path=tmp_path
    )
    math_rows = [r for key, r in report["results"].items() if key.endswith(" math")]
    assert [r["kind"] for r in math_rows] == ["self", "cross"] and report["tokens"] == 8
    # Timings are only checked to exist: under load a backward can measure shorter than the forward it follows.
    assert all(r["forward_s"] > 0 and "backward_s" in r and r["error"] < 1e-5 for r in math_rows)
    assert "failed" in report["results"]["tiny self fa4"]  # the CPU: FlashAttention-4 refuses, the run goes on


def test_generate_benchmark(tmp_path: Path) -> None:
    """The end-to-end run with its stages; --compile-in-sampling compiles inside the timed sampling (no stage of its
    own), as generate does."""
    size = ["--device", "cpu", "--frames", "5", "--height", "64", "--width", "64", "--steps", "2"]
    report = _run(
        "generate", "--variant", "tiny", "--t5", "tiny", *size, "--compile", "--compile-in-sampling", tmp_path=tmp_path
    )
    assert set(report["stages"]) == {"text_encoder", "sampling", "decode", "write"}
    assert report["self_attention_kernel"] == "sdpa" and report["attention"] == "auto"
    assert report["end_to_end_s"] == pytest.approx(sum(stage["s"] for stage in report["stages"].values()))
    assert report["stages"]["sampling"]["s"] > 0 and report["compile"] is True


def test_decode_writers_benchmark(tmp_path: Path) -> None:
    """generate's decode stage with and without the writers beside it, and with the writers as threads or as a
    child process: every run reports its decode time, the written ones also the writers' time after the last
    chunk."""
    report = _run("decode_writers", *SMALL, "--dtype", "fp32", "--writer-runs", "1", tmp_path=tmp_path)
    assert report["size"] == "5x16x16" and len(report["runs"]) == 11
    kinds = ["writer threads", "writer process", "writer process started ahead"]
    assert {f"warm, default formats, {kind}" for kind in kinds} <= report["runs"].keys()
    for run, timing in report["runs"].items():
        assert timing["decode_s"] > 0, run
        assert ("write_s" in timing) == ("decode only" not in run), run


@pytest.mark.parametrize("script", ["train_dit", "dit", "profile_step"])
def test_dit_benchmarks(script: str, tmp_path: Path) -> None:
    size = ["--device", "cpu", "--frames", "5", "--height", "64", "--width", "64"]
    if script == "train_dit":
        report = _run(
            script,
            "--variants",
            "tiny",
            *size,
            "--repeat",
            "1",
            "--modes",
            "dora:keep1:float32",
            "lora:recompute:float64",
            "--compile-memory-budget",  # reported; compiled modes (20 s of a cold CI run) are train-dit --compile's,
            "0.5",  # tested with this budget by test_train_dit.py::test_speed_levers_train_the_same
            tmp_path=tmp_path,
        )
        assert report["compile_memory_budget"] == 0.5 and len(report["results"]) == 2
        assert all(r["step_s"] > 0 and r["adapter_params_m"] > 0 for r in report["results"].values())
    elif script == "dit":
        report = _run(
            script, "--variants", "tiny", *size, "--repeat", "1", "--modes", "float32:default", tmp_path=tmp_path
        )
        assert all(r["forward_s"] > 0 for r in report["results"].values())
    else:
        report = _run(script, "--variant", "tiny", *size, "--top", "3", tmp_path=tmp_path)
        assert report["kernel_ms"] > 0 and len(report["top"]) == 3


def test_train_dit_gradient_gate(tmp_path: Path) -> None:
    """train_dit.py --gradients: one step's loss and adapter gradients over an FP8 base against the bf16 base, same
    weights, adapters and draws (off Hopper --fp8-gemm falls back to the weight-only path, so the two FP8 runs agree
    exactly); FP8's errors are small but not zero, and the report names its worst tensor."""
    size = ["--device", "cpu", "--frames", "5", "--height", "64", "--width", "64"]
    report = _run("train_dit", "--variants", "tiny", *size, "--gradients", "1", tmp_path=tmp_path)
    gate = report["gradients"]["tiny"]
    assert gate["blocks"] == 1 and gate["scaled_mm"] is False and gate["gate"] is True
    weight_only, gemm = gate["fp8"], gate["fp8-gemm"]
    assert weight_only["adapter_tensors"] == 30 and weight_only["fp8_gemm_linears"] == 0  # 10 linears × (A, B, m)
    assert gemm["fp8_gemm_linears"] == 10 and gemm["grad_rel_err"] == weight_only["grad_rel_err"]
    assert 0 < weight_only["loss_rel_diff"] < 1e-3 and 0 < weight_only["grad_rel_err"] < 0.1
    assert weight_only["grad_rel_err_median"] <= weight_only["grad_rel_err_worst"]
    assert weight_only["worst_tensor"].startswith("blocks.0.") and 0 < weight_only["worst_tensor_norm_share"] <= 1


def test_fp8_benchmark(tmp_path: Path) -> None:
    """Linears and DiT forwards, bf16 against FP8 weights (off Hopper: the weight-only FP8 path only)."""
    size = ["--device", "cpu", "--frames", "5", "--height", "64", "--width", "64", "--tokens", "32"]
    report = _run("fp8", "--variants", "tiny", *size, "--repeat", "1", tmp_path=tmp_path)
    assert set(report["linears"]) == {"q, k, v, o", "ffn.0"}
    for row in report["linears"].values():
        assert 0 < row["bf16"]["error"] < row["fp8 weight-only"]["error"] < 0.1
    bf16, quantised = report["forwards"]["tiny bf16"], report["forwards"]["tiny fp8"]
    assert quantised["linears_quantised"] == 2 * 10  # ten block linears in each of the tiny DiT's two blocks
    assert quantised["weights_gib"] < bf16["weights_gib"] and 0 < quantised["error_vs_bf16"] < 0.1


def test_fp8_quality_benchmark(tmp_path: Path, tiny_stage2) -> None:
    """fp8_quality.py on a tiny generate config: the reference and the FP8 run (weights and emulated FP8 attention)
    of two of its fixed prompts, compared clip by clip, measured and scored."""
    from test_generate import _generate

    sys.path.insert(0, str(BENCHMARKS))
    from fp8_quality import default_prompts

    _generate(tmp_path, tiny_stage2, "run")  # its config.yaml is the benchmark's input
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(default_prompts()[:2]) + "\n")
    args = ["--generate-config", str(tmp_path / "run/config.yaml"), "--prompts", str(prompts), "--fp8", "both"]
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "fp8_quality.py"), *args, "--out", str(tmp_path / "q")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "q/report.json").read_text())
    assert (report["reference_dtype"], report["fp8"], report["fp8_attention"]) == ("fp32", "both", "emulated")
    assert [row["prompt"] for row in report["clips"]] == default_prompts()[:2]
    assert all(row["psnr_rgba_db"] > 0 for row in report["clips"])  # FP8 changes the clips, within reason
    assert set(report["demo_measures"]) == set(report["eval_mean"]) == {"fp32", "fp8"}


@pytest.mark.parametrize(
    ("mode", "problem"),
    [
        ("fp16", "unknown mode 'fp16'"),
        ("bf16+cll", "unknown lever 'cll'"),
        ("bf16+chunk0", "unknown lever 'chunk0'"),
        ("bf16+chunkx", "unknown lever 'chunkx'"),
        ("bf16+cl+chunk2+serial", None),
        ("bf16+cl+sum+nosum", "+sum and +nosum together"),
        ("bf16+rooms+norooms", "+rooms and +norooms together"),
        ("bf16+cl+nosum+norooms", None),
        ("fp32", None),
    ],
)
def test_vae_benchmark_checks_its_modes(mode: str, problem: str | None) -> None:
    """vae.py's --modes: an unknown mode or lever (or a chunk count under 1) is named, good ones pass."""
    sys.path.insert(0, str(BENCHMARKS))
    from vae import mode_problem

    found = mode_problem(mode)
    assert found is None if problem is None else found.startswith(problem)


def test_vae_benchmark_refuses_an_unknown_mode_in_one_line() -> None:
    """A bad --modes entry is a usage error of one line (exit 2), before any model is built: no traceback."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "vae.py"), "--device", "cpu", "--modes", "fp32", "bf16+cll"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "vae.py: error: --modes bf16+cll: unknown lever 'cll': choose from cl, previous, pytorch, upsampled, dual, "
        "serial, fewhead, nofewhead, rooms, norooms, sum, nosum, or chunkN with N ≥ 1"
    )
