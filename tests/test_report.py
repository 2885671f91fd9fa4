"""`fv-compile report` end to end on CPU: files, fields, consistency of the numbers, failure
isolation, and the command line's errors. One small run (wan-tiny at 32 tokens, compiler="eager")
is shared by the tests that read its output."""

import contextlib
import io
import json
import statistics
import subprocess
import sys

import pytest
import torch

import fv_compile
from fv_compile.backends import registry
from fv_compile.cli import main
from fv_compile.report import parse_backends
from fv_compile.report.variants import default_backends

RAISING = "REPORT_TEST_RAISES"
ARGS = [
    "report", "--model", "wan-tiny", "--grid", "2,8,8", "--compiler", "eager", "--device", "cpu",
    "--backends", f"auto,{RAISING}", "--steps", "2", "--warmup", "1", "--repeat", "2",
]  # fmt: skip


class _RaisingImpl(fv_compile.AttentionImpl):
    def __init__(
        self,
        num_heads,
        head_size,
        softmax_scale,
        causal=False,
        num_kv_heads=None,
        prefix="",
        **extra,
    ):
        pass

    def forward(self, query, key, value, attn_metadata):
        raise RuntimeError("boom from the test backend")


class _RaisingBackend(fv_compile.AttentionBackend):
    @staticmethod
    def get_name():
        return RAISING

    @staticmethod
    def get_impl_cls():
        return _RaisingImpl

    @staticmethod
    def get_metadata_cls():
        return fv_compile.AttentionMetadata

    @staticmethod
    def get_builder_cls():
        return None


@pytest.fixture(scope="module")
def raising_backend():
    fv_compile.register_backend(RAISING, _RaisingBackend)
    yield RAISING
    registry._USER.pop(RAISING, None)  # no public unregister; keep other test files' registry clean


@pytest.fixture(scope="module")
def run(raising_backend, tmp_path_factory):
    out = tmp_path_factory.mktemp("fv-report")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main([*ARGS, "--out", str(out)])
    return {
        "rc": rc,
        "out": out,
        "stdout": stdout.getvalue(),
        "stderr": stderr.getvalue(),
        "json": json.loads((out / "report.json").read_text()),
    }


def _variants(run):
    return {v["name"]: v for v in run["json"]["variants"]}


def test_writes_the_three_files_and_prints_the_table(run):
    out = run["out"]
    assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "report.md").read_text()
    for heading in (
        "## Variants",
        "## Attention share of one step",
        "## Attention sites",
        "## Environment",
    ):
        assert heading in markdown
    for name in ("eager", "torch.compile", "fv_compile[auto]", f"fv_compile[{RAISING}]"):
        assert f"| {name} |" in markdown
        assert name in run["stdout"]
    assert "blocks.0.self_attn" in markdown  # the explain table
    assert "[1/4] eager" in run["stderr"]  # plain progress lines when not a TTY


def test_json_has_environment_config_and_per_variant_fields(run):
    data = run["json"]
    env = data["environment"]
    for key in (
        "date",
        "command",
        "python",
        "torch",
        "cuda",
        "triton",
        "fv_compile",
        "git_commit",
        "gpu",
        "driver",
    ):
        assert key in env
    assert env["torch"] == torch.__version__
    assert env["command"].startswith("fv-compile report")
    assert data["config"]["backends"] == ["auto", RAISING]
    assert data["workload"]["video_tokens"] == 2 * 4 * 4
    assert set(data["methods"]) >= {"latency", "compile", "error", "attention share"}
    fields = {
        "name", "status", "latency", "speedup_vs_eager", "speedup_vs_torch_compile", "compile_s",
        "graphs", "recompiles", "peak_memory_bytes", "error_vs_eager", "attention", "explain",
    }  # fmt: skip
    for v in data["variants"]:
        assert fields <= set(v)


def test_speedups_are_ratios_of_medians(run):
    variants = _variants(run)
    eager = variants["eager"]["latency"]["median_ms"]
    compiled = variants["torch.compile"]["latency"]["median_ms"]
    for v in variants.values():
        if v["status"] != "ok":
            continue
        lat = v["latency"]
        assert len(lat["samples_ms"]) == 2
        assert lat["median_ms"] == pytest.approx(statistics.median(lat["samples_ms"]), rel=1e-12)
        assert lat["min_ms"] <= lat["median_ms"] <= lat["max_ms"]
        assert v["speedup_vs_eager"] == pytest.approx(eager / lat["median_ms"], rel=1e-12)
        assert v["speedup_vs_torch_compile"] == pytest.approx(
            compiled / lat["median_ms"], rel=1e-12
        )
    assert variants["eager"]["speedup_vs_eager"] == pytest.approx(1.0)


def test_accuracy_and_compile_facts(run):
    variants = _variants(run)
    assert variants["eager"]["error_vs_eager"] is None
    fv = variants["fv_compile[auto]"]
    # float32 on the CPU; on a GPU the report runs bfloat16, and kernels differ from eager by
    # bf16 rounding of the weights
    tight = run["json"]["config"]["dtype"] == "float32"
    assert fv["error_vs_eager"]["rel_fro"] < (1e-5 if tight else 2e-2)
    assert fv["error_vs_eager"]["cosine"] > (0.99999 if tight else 0.999)
    assert fv["graphs"] == 1 and fv["recompiles"] == 0  # two timesteps, one graph
    assert fv["compile_s"] >= 0
    assert fv["explain"]["summary"] == {"found": 4, "rewritten": 4}
    share = fv["attention"]
    assert share["calls"] == 4 and 0 < share["share"] < 1
    assert 0 < run["json"]["eager_attention"]["share"]["share"] < 1


def test_failing_variant_is_reported_and_the_others_still_run(run):
    variants = _variants(run)
    failed = variants[f"fv_compile[{RAISING}]"]
    assert failed["status"] == "failed"
    assert failed["failed_during"] == "first pass"
    assert "boom from the test backend" in failed["error"]
    assert failed["latency"] is None and failed["speedup_vs_eager"] is None
    assert [v["status"] for v in run["json"]["variants"]].count("ok") == 3
    assert "boom from the test backend" in (run["out"] / "report.md").read_text()


def test_default_backends_leave_out_what_cannot_run(raising_backend):
    backends = default_backends(torch.device("cpu"), torch.float32)
    assert backends[0] == "auto"
    assert RAISING not in backends  # dense, but its probe call raises
    assert "TORCH_SDPA" not in backends  # what auto already runs on CPU


def test_parse_backends():
    assert parse_backends("auto, torch_sdpa;self=TORCH_SDPA,cross=auto") == [
        "auto",
        "TORCH_SDPA",
        {"self": "TORCH_SDPA", "cross": "auto"},
    ]
    assert parse_backends("auto,auto") == ["auto"]
    with pytest.raises(ValueError, match="roles are"):
        parse_backends("video=TORCH_SDPA")


def test_help_runs_as_a_module():
    done = subprocess.run(
        [sys.executable, "-m", "fv_compile", "report", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    for option in (
        "--model",
        "--grid",
        "--backends",
        "--compiler",
        "--steps",
        "--skip-torch-compile",
        "--no-plot",
    ):
        assert option in done.stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "wan-huge"], "valid presets: wan-tiny"),
        (["--grid", "3,32"], "T,H,W"),
        (["--grid", "a,b,c"], "T,H,W"),
        (["--grid", "2,7,8"], "not a positive multiple of patch"),
        (["--grid", "2,8,8", "--frames", "9"], "not both"),
        (["--backends", "NO_SUCH_BACKEND"], "valid names: "),
        (["--dtype", "int8"], "choose float32, bfloat16 or float16"),
        (["--repeat", "0"], "positive integer"),
        (
            ["--fastvideo-arg", "sta_windows=1,1,1"],
            "a FastVideoArgs field (patch_size, sta_tile_size",
        ),
    ],
)
def test_bad_arguments_give_clear_errors(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", *argv, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()


def test_every_fv_compile_variant_is_verified_site_by_site(run):
    fv = _variants(run)["fv_compile[auto]"]
    assert fv["verify"]["verified"] is True
    assert fv["verify"]["sites"] == 4 and fv["verify"]["failed"] == 0
    assert fv["verify"]["worst_rel_l2"] < (
        1e-5 if run["json"]["config"]["dtype"] == "float32" else 3e-2
    )
    assert "4/4 ok" in (run["out"] / "report.md").read_text()


# -- exit status, timing outliers, dense STA, cold/warm compile, the CPU gap ------------------------


def test_report_exits_nonzero_when_a_variant_fails(run):
    assert run["rc"] == 1
    assert f"1 variant(s) failed (fv_compile[{RAISING}])" in run["stderr"]
    assert (run["out"] / "report.json").exists()  # the report is written all the same


def test_timing_outliers_are_flagged_by_max_over_median_or_min():
    from fv_compile.report.measure import LatencyStats, timing_outliers

    flagged = timing_outliers(LatencyStats.of([1.38, 1.41, 1.40, 894.0]))
    assert flagged is not None and "1 of 4 loops above 1.5x the median" in flagged
    assert timing_outliers(LatencyStats.of([10.0, 10.4, 11.0])) is None
    assert timing_outliers(LatencyStats.of([5.0, 10.0, 10.5])) is not None  # max/min > 2


def test_a_noisy_variant_says_so_in_its_status_and_the_notes_state_the_rule(run):
    from fv_compile.report.measure import TIMING_RULE, LatencyStats, timing_outliers
    from fv_compile.report.render import report_notes, status_cell
    from fv_compile.report.variants import VariantResult

    noisy = VariantResult("torch.compile", "torch.compile", None)
    noisy.latency = LatencyStats.of([1.38, 1.4, 894.0])
    noisy.timing_flag = timing_outliers(noisy.latency)
    assert status_cell(noisy) == "ok, noisy timing"
    report = _report(run, [noisy])
    (note,) = [n for n in report_notes(report) if n.startswith("Noisy timing")]
    assert "**torch.compile**: max/median" in note and TIMING_RULE in note


def _report(run, variants):
    from fv_compile.report.run import EagerAttention, Report

    data = run["json"]
    return Report(data["config"], data["environment"], data["workload"], variants, EagerAttention())


def test_the_report_says_fv_compile_ran_as_compiled_by_default(run):
    fv = _variants(run)["fv_compile[auto]"]
    assert fv["regional"] == "the repeated blocks in blocks"
    assert run["json"]["config"]["regional"] == "auto"
    assert (
        "as a user gets it by default (regional='auto'): it compiled the repeated blocks in blocks"
        in (run["out"] / "report.md").read_text()
    )


def test_regional_off_compiles_the_whole_model():
    from fv_compile.models import build_model
    from fv_compile.report.variants import FV_COMPILE, VariantSpec, _build, _what_compiled

    model = build_model("wan-tiny")
    spec = VariantSpec(FV_COMPILE, "auto")
    assert _what_compiled(spec, _build(spec, model, "eager", False), model) == "the whole model"
    assert (
        _what_compiled(spec, _build(spec, model, "eager", "auto"), model)
        == "the repeated blocks in blocks"
    )


def test_the_compile_column_separates_cold_from_warm(run):
    markdown = (run["out"] / "report.md").read_text()
    assert "| compile s (cold / warm) |" in markdown
    fv = _variants(run)["fv_compile[auto]"]
    assert fv["compile_s"] >= 0 and fv["cold_cache"] is None  # compiler="eager": no Inductor cache
    assert (
        fv["warm_compile_s"] is None
        and "compiler='eager' keeps no compile cache" in fv["warm_note"]
    )


def test_warm_compile_hits_the_caches_the_cold_compile_wrote(tmp_path):
    """Inductor with its caches on, in a process of its own (the suite disables them), on a model
    with no C++ kernel to build: the variant's cold compile starts from an empty cache, and its
    warm compile is served by what the cold one wrote (fv_compile's site ids included)."""
    import os

    env = {
        **os.environ,
        "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "0",
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path),
    }
    probe = os.path.join(os.path.dirname(__file__), "_warm_probe.py")
    done = subprocess.run(
        [sys.executable, probe, "fv_compile"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    fv = json.loads(done.stdout.strip().splitlines()[-1])
    assert fv["status"] == "ok", fv
    assert fv["cold_cache"].startswith("an empty Inductor cache directory")
    hits = fv["warm_cache_hits"]
    assert (hits["fx_graph_hit"], hits["fx_graph_miss"], hits["aot_autograd_hit"]) == (1, 0, 1), (
        hits
    )
    assert fv["warm_note"].startswith("FX graph cache 1 hit(s)")
    assert 0 <= fv["warm_compile_s"] < fv["compile_s"]


def test_the_cpu_report_says_why_fv_compile_trails_torch_compile_or_not(run):
    (paragraph,) = run["json"]["analysis"]
    fv, tc = _variants(run)["fv_compile[auto]"], _variants(run)["torch.compile"]
    ratio = tc["latency"]["median_ms"] / fv["latency"]["median_ms"]
    verdict = (
        "trails"
        if round(ratio, 2) < 1
        else "is on par with"
        if round(ratio, 2) == 1
        else "does not trail"
    )
    assert paragraph.startswith(f"**fv_compile[auto] {verdict} plain torch.compile: {ratio:.2f}x**")
    assert "fv_compile::attention op(s)" in paragraph and "aten::_scaled_dot_product" in paragraph
    assert paragraph in (run["out"] / "report.md").read_text()


def _gap_results(fv_ms, tc_ms, fv_eager_ms, overhead_ms):
    from fv_compile.report.measure import AttentionShare, LatencyStats
    from fv_compile.report.variants import VariantResult

    tc = VariantResult("torch.compile", "torch.compile", None, latency=LatencyStats.of([tc_ms]))
    tc.attention = AttentionShare(0.0, tc_ms, 0, "cpu", kernel_ms=0.0, compiled_ms=tc_ms - 0.5)
    fv = VariantResult("fv_compile[auto]", "fv_compile", "auto", latency=LatencyStats.of([fv_ms]))
    fv.regional = "the repeated blocks in blocks"
    kernels = {"aten::_scaled_dot_product_flash_attention_for_cpu": 4}
    fv.attention = AttentionShare(
        20.0 + overhead_ms,
        fv_ms,
        4,
        "cpu",
        kernel_ms=20.0,
        kernels=kernels,
        compiled_ms=fv_ms - fv_eager_ms,
    )
    return [tc, fv]


def test_the_cpu_gap_names_the_eager_code_between_blocks_when_that_is_what_it_measured():
    from fv_compile.report.run import cpu_gap_analysis

    (text,) = cpu_gap_analysis(
        _gap_results(fv_ms=100.0, tc_ms=89.0, fv_eager_ms=10.5, overhead_ms=0.4)
    )
    assert text.startswith(
        "**fv_compile[auto] trails plain torch.compile: 0.89x** (+11.00 ms per step"
    )
    assert (
        "The largest measured cause is the eager code outside compiled graphs (10.00 of the 11.00 ms"
        in text
    )
    assert "--regional off" in text


def test_the_cpu_gap_names_the_op_overhead_when_that_is_what_it_measured():
    from fv_compile.report.run import cpu_gap_analysis

    (text,) = cpu_gap_analysis(
        _gap_results(fv_ms=100.0, tc_ms=89.0, fv_eager_ms=0.5, overhead_ms=9.0)
    )
    assert (
        "The largest measured cause is the attention ops' overhead around their kernels (9.00 of"
        in text
    )
    assert "2250 us per op" in text


def test_the_cpu_gap_says_when_fv_compile_stops_trailing():
    from fv_compile.report.run import cpu_gap_analysis

    (text,) = cpu_gap_analysis(
        _gap_results(fv_ms=80.0, tc_ms=89.0, fv_eager_ms=0.5, overhead_ms=0.4)
    )
    assert text.startswith("**fv_compile[auto] does not trail plain torch.compile: 1.11x**")
    assert "largest measured cause" not in text


@pytest.mark.parametrize(
    "name,kind",
    [
        ("void at::native::elementwise_kernel<128, 2, direct_copy_kernel_cuda>", "copy"),
        ("Memcpy DtoD (Device -> Device)", "copy"),
        ("triton_poi_fused_clone_3", "copy"),
        ("void at::native::index_elementwise_kernel<128, 4>", "copy"),
        ("triton_poi_fused_add_mul_0", "pointwise"),
        ("triton_poi_fused__to_copy_add_mean_mul_3", "pointwise"),
        ("triton_poi_fused_cat_clone_view_2", "copy"),
        ("triton_red_fused_native_layer_norm_1", "reduction"),
        ("triton_red_fused__to_copy_add_attention_mean_mul_pow_rsqrt_view_1", "reduction"),
        ("triton_tem_fused_mm_0", "gemm"),
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "gemm"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7", "attention"),
        ("kernel_cutlass_flash_attncuteflash_fwd_sm90FlashAttentionForwardSm90_0", "attention"),
        ("_block_sparse_fwd_kernel", "attention"),
        ("_plan_kernel", "other"),
    ],
)
def test_kernels_are_sorted_by_what_their_names_say_they_do(name, kind):
    from fv_compile.report.measure import kernel_kind

    assert kernel_kind(name) == kind


def test_a_gpu_profiled_step_lists_its_kernels_by_kind_and_the_costliest(run):
    from fv_compile.report.measure import AttentionShare, LatencyStats
    from fv_compile.report.render import render_markdown
    from fv_compile.report.variants import VariantResult

    fv = VariantResult("fv_compile[auto]", "fv_compile", "auto", latency=LatencyStats.of([9.0]))
    fv.attention = AttentionShare(
        4.0,
        9.0,
        2,
        "gpu",
        step_kernels_ms={"attention": 3.5, "gemm": 4.0, "copy": 0.25},
        op_kernels_ms={"attention": 3.5, "copy": 0.25},
        top_kernels=[("nvjet_tst_gemm", 8, 4.0), ("flash_fwd", 2, 3.5)],
    )
    text = render_markdown(_report(run, [fv]))
    section = text.split("## GPU kernels of one profiled step")[1].split("\n## ")[0]
    assert "| fv_compile[auto] | 7.75 | 3.50 | 4.00 | 0.25 | attention 3.50, copy 0.25 |" in section
    assert "| nvjet_tst_gemm | 8 | 4.00 |" in section


def test_a_cpu_report_has_no_gpu_kernel_section(run):
    assert "## GPU kernels of one profiled step" not in (run["out"] / "report.md").read_text()


class _Event:
    """A profiler event as `attention_share` reads it."""

    def __init__(self, name, device="cpu", id=0, parent=None, us=0.0, annotation=False):
        from torch.autograd import DeviceType

        self.name, self.id = name, id
        self.device_type = DeviceType.CUDA if device == "cuda" else DeviceType.CPU
        self.is_user_annotation = annotation
        self.cpu_parent, self.cpu_children = parent, []
        if parent is not None:
            parent.cpu_children.append(self)
        self.time_range = type("Interval", (), {"elapsed_us": lambda _, us=us: us})()


def test_a_gpu_step_counts_each_kernel_once_for_the_event_that_launched_it():
    """A kernel carries its launching runtime call's id; torch also adds it to events sharing
    the op's id (module loading under the launch), so an op's device total counts it twice. The
    share counts it once, under the op above its launch call."""
    from fv_compile.report.measure import ATTENTION_OP, STEP_RANGE, attention_share

    step = _Event(STEP_RANGE, id=1)
    region = _Event("Torch-Compiled Region: 0/0", id=2, parent=step)
    op = _Event(ATTENTION_OP, id=3, parent=region)
    sdpa = _Event("aten::_scaled_dot_product_cudnn_attention", id=4, parent=op)
    launch = _Event("cudaLaunchKernel", id=101, parent=sdpa)
    loading = _Event("Lazy Function Loading", id=4, parent=launch)  # the op's id again
    gemm_launch = _Event("cuLaunchKernel", id=102, parent=region)
    events = [step, region, op, sdpa, launch, loading, gemm_launch]
    events += [
        _Event("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "cuda", id=101, us=4000.0),
        _Event("nvjet_sm90_tst_gemm", "cuda", id=102, us=3000.0),
        _Event("void at::native::direct_copy_kernel_cuda", "cuda", id=999, us=500.0),
        _Event(STEP_RANGE, "cuda", id=1, us=9000.0, annotation=True),
    ]
    share = attention_share(events, on_gpu=True)
    assert (share.attention_ms, share.kernel_ms, share.step_ms) == (4.0, 4.0, 7.5)
    assert share.compiled_ms == 7.0  # the copy's launch call is not in the profile
    assert share.op_kernels_ms == {"attention": 4.0}
    assert share.step_kernels_ms == {"attention": 4.0, "gemm": 3.0, "copy": 0.5}
    assert share.top_kernels[0] == ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 1, 4.0)


def test_a_gpu_step_whose_kernels_no_event_claims_is_an_error_not_a_zero_share():
    from fv_compile.report.measure import ATTENTION_OP, attention_share

    events = [_Event(ATTENTION_OP, id=3), _Event("flash_fwd", "cuda", id=7, us=10.0)]
    with pytest.raises(RuntimeError, match="linked none of the step's 1 device kernels"):
        attention_share(events, on_gpu=True)
