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
    "report", "--model", "wan-tiny", "--grid", "2,8,8", "--compiler", "eager",
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
    assert run["rc"] == 0
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
    assert fv["verify"]["worst_rel_l2"] < (1e-5 if run["json"]["config"]["dtype"] == "float32" else 3e-2)
    assert "4/4 ok" in (run["out"] / "report.md").read_text()
