"""`fv-compile explain` and what `fv-compile report` accepts: any diffusers video transformer at any
size, the exit status, and an STA variant that ran dense. Small runs on CPU with compiler="eager"."""

import contextlib
import io
import json

import pytest
import torch

import fv_compile
from fv_compile.backends import registry
from fv_compile.backends.sdpa import SDPABackend
from fv_compile.cli import main, recorded_command
from fv_compile.report.variants import dense_steps, unserved_reason
from fv_compile.report.workload import load_workload
from fv_compile.site import REWRITTEN, AttentionSite


def _main(*argv):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            rc = main(list(argv))
        except SystemExit as exit_:  # argparse's errors
            rc = exit_.code
    return rc, stdout.getvalue(), stderr.getvalue()


# the CLI's behaviour, on the CPU wherever the suite runs (GPU figures come from benchmarks/)
QUICK = [
    "--device",
    "cpu",
    "--compiler",
    "eager",
    "--steps",
    "1",
    "--warmup",
    "0",
    "--repeat",
    "1",
    "--no-plot",
]


def test_the_recorded_command_names_no_path_of_this_machine(monkeypatch):
    monkeypatch.setattr(
        "sys.argv", ["/opt/env/lib/fv_compile/__main__.py", "report", "--steps", "1"]
    )
    assert recorded_command(None) == ["fv-compile", "report", "--steps", "1"]
    assert recorded_command(["explain"]) == ["fv-compile", "explain"]


# -- explain ---------------------------------------------------------------------------------------


def test_explain_prints_the_sites_table_of_a_preset():
    rc, out, _ = _main("explain", "--model", "wan-tiny", "--grid", "2,8,8")
    assert rc == 0
    assert "fv_compile: 4 attention site(s) in 1 graph(s), 4 rewritten" in out
    assert "blocks.1.cross_attn" in out and "TORCH_SDPA" in out
    assert out.startswith("wan-tiny: WanModel")


def test_explain_shows_graph_breaks(monkeypatch):
    from fv_compile.models.wan import WanModel

    forward = WanModel.forward

    def broken(self, *args, **kwargs):
        torch._dynamo.graph_break()
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(WanModel, "forward", broken)
    rc, out, _ = _main("explain", "--model", "wan-tiny", "--grid", "2,8,8")
    assert rc == 0
    assert "graph break(s)" in out and "graph breaks (the code at each break ran eagerly):" in out
    assert "Call to `torch._dynamo.graph_break()`" in out


def test_explain_takes_a_diffusers_class_its_config_and_size_and_writes_json(tmp_path):
    pytest.importorskip("diffusers")
    path = tmp_path / "sites.json"
    rc, out, _ = _main(
        "explain", "--model", "diffusers:LTXVideoTransformer3DModel", "--config", "num_layers=1",
        "--frames", "9", "--height", "128", "--width", "96", "--verify", "--json", str(path),
    )  # fmt: skip
    assert rc == 0, out
    data = json.loads(path.read_text())
    assert data["workload"]["latent_grid"] == [2, 4, 3]  # LTX-Video's VAE: 8x in time, 32x in space
    assert data["summary"] == {"found": 2, "rewritten": 2} and data["verified"] is True
    assert "verified 2/2 ok" in out


def test_explain_rejects_an_unknown_config_key_naming_the_valid_ones(capsys):
    pytest.importorskip("diffusers")
    rc, _, err = _main(
        "explain", "--model", "diffusers:WanTransformer3DModel", "--config", "num_layer=1"
    )
    assert rc == 2
    assert "takes no config key 'num_layer' (did you mean 'num_layers'?)" in err


def test_explain_rejects_an_unknown_zoo_config_field():
    rc, _, err = _main("explain", "--model", "wan-tiny", "--config", "heads=3")
    assert rc == 2 and "--config heads: wan-tiny has no such field" in err and "num_heads" in err


# -- report: any diffusers video transformer, at any size ----------------------------------------------


@pytest.fixture(scope="module")
def ltx_report(tmp_path_factory):
    pytest.importorskip("diffusers")
    out = tmp_path_factory.mktemp("ltx-report")
    rc, stdout, stderr = _main(
        "report", "--model", "diffusers:LTXVideoTransformer3DModel", "--config", "num_layers=2",
        "--frames", "9", "--height", "64", "--width", "64", "--backends", "auto", *QUICK, "--out", str(out),
    )  # fmt: skip
    return {
        "rc": rc,
        "stdout": stdout,
        "stderr": stderr,
        "json": json.loads((out / "report.json").read_text()),
    }


def test_report_takes_ltx_video_with_its_size(ltx_report):
    workload = ltx_report["json"]["workload"]
    assert workload["model"] == "diffusers:LTXVideoTransformer3DModel(tiny,num_layers=2)"
    assert workload["latent_grid"] == [2, 2, 2] and workload["video_tokens"] == 8


def test_report_runs_diffusers_compile_repeated_blocks_as_its_own_variant(ltx_report):
    variants = {v["name"]: v for v in ltx_report["json"]["variants"]}
    assert list(variants) == [
        "eager",
        "torch.compile",
        "compile_repeated_blocks",
        "fv_compile[auto]",
    ]
    blocks = variants["compile_repeated_blocks"]
    assert blocks["status"] == "ok" and blocks["error_vs_eager"]["rel_fro"] < 1e-5
    assert (
        blocks["regional"]
        == "each LTXVideoTransformerBlock block (diffusers' compile_repeated_blocks)"
    )
    assert blocks["graphs"] == 1  # one block graph serves both blocks


def test_report_exits_zero_when_every_variant_runs(ltx_report):
    assert ltx_report["rc"] == 0, ltx_report["stderr"][-2000:]
    assert all(v["status"] == "ok" for v in ltx_report["json"]["variants"])


@pytest.mark.parametrize(
    "flags, want",
    [
        ([], ["eager", "torch.compile", "compile_repeated_blocks", "fv_compile"]),
        (["--skip-whole-model-compile"], ["eager", "compile_repeated_blocks", "fv_compile"]),
        (["--skip-torch-compile"], ["eager", "fv_compile"]),
    ],
)
def test_skipping_the_whole_model_compile_keeps_compile_repeated_blocks(flags, want):
    pytest.importorskip("diffusers")
    from fv_compile.cli import _report_config, build_parser
    from fv_compile.report.run import variant_specs

    name = "diffusers:LTXVideoTransformer3DModel"
    args = build_parser().parse_args(["report", "--model", name, "--backends", "auto", *flags])
    config = _report_config(args)
    assert [s.kind for s in variant_specs(config, load_workload(name).model, ["auto"])] == want


def test_compile_repeated_blocks_leaves_the_users_model_uncompiled():
    pytest.importorskip("diffusers")
    from fv_compile.report.variants import (
        REPEATED_BLOCKS,
        VariantSpec,
        _build,
        _undo_in_place_compile,
    )

    model = load_workload("diffusers:LTXVideoTransformer3DModel").model
    _build(VariantSpec(REPEATED_BLOCKS), model, "eager", "auto")
    assert any(m._compiled_call_impl is not None for m in model.modules())
    _undo_in_place_compile(model)
    assert all(m._compiled_call_impl is None for m in model.modules())


def test_report_rejects_a_size_the_patch_does_not_tile(tmp_path):
    pytest.importorskip("diffusers")
    rc, _, err = _main(
        "report",
        "--model",
        "diffusers:WanTransformer3DModel",
        "--grid",
        "2,7,8",
        "--out",
        str(tmp_path),
    )
    assert rc == 2 and "latent grid (2, 7, 8) is not a positive multiple of patch (1, 2, 2)" in err
    assert not (tmp_path / "report.json").exists()


# -- an STA variant whose window covers the whole grid ran dense -----------------------------------


def _sta_workload(**fastvideo):
    workload = load_workload("wan-tiny", grid=(2, 8, 8))  # token grid (2, 4, 4)
    workload.fastvideo_overrides = fastvideo
    return workload


def test_a_window_that_covers_the_grid_makes_every_step_dense():
    steps, reason = dense_steps(["SLIDING_TILE_ATTN"], _sta_workload(sta_window=(1, 1, 1)), 2)
    assert steps == [0, 1]
    assert (
        "sta_window (1, 1, 1) covers the whole grid of (1, 1, 1) tiles "
        "(token grid (2, 4, 4) in tiles of (6, 8, 8))"
    ) in reason


def test_a_window_smaller_than_the_grid_is_sparse_after_the_dense_steps():
    workload = _sta_workload(sta_window=(1, 1, 1), sta_tile_size=(1, 2, 2), sta_dense_steps=1)
    steps, reason = dense_steps(["SLIDING_TILE_ATTN"], workload, 3)
    assert steps == [0] and "step(s) 0 are full attention by schedule (sta_dense_steps=1)" in reason
    assert dense_steps(["TORCH_SDPA"], workload, 3) == (
        None,
        None,
    )  # a dense backend: nothing to say


def test_an_sta_variant_that_ran_dense_says_so_instead_of_ok(tmp_path):
    rc, stdout, _ = _main(
        "report", "--model", "wan-tiny", "--grid", "2,8,8", "--backends", "SLIDING_TILE_ATTN",
        "--fastvideo-arg", "sta_window=1,1,1", "--skip-torch-compile", *QUICK, "--out", str(tmp_path),
    )  # fmt: skip
    assert rc == 0  # measured: not a failure
    (sta,) = [
        v
        for v in json.loads((tmp_path / "report.json").read_text())["variants"]
        if v["kind"] == "fv_compile"
    ]
    assert sta["status"] == "ran dense" and sta["dense_steps"] == [0]
    markdown = (tmp_path / "report.md").read_text()
    assert "| fv_compile[SLIDING_TILE_ATTN] | ran dense |" in markdown
    assert (
        "**fv_compile[SLIDING_TILE_ATTN]** ran dense, not sparse: every step of the loop was full attention"
        in markdown
    )
    assert "ran dense" in stdout


# -- a variant whose backend ran no site says so -----------------------------------------------------


class _Bfloat16OnlyBackend(SDPABackend):
    """Declares bfloat16 only: every float32 site falls back to another backend."""

    dtypes = ("bfloat16",)

    @staticmethod
    def get_name():
        return BF16_ONLY


BF16_ONLY = "CLI_TEST_BF16_ONLY"


@pytest.fixture
def bf16_only_backend():
    fv_compile.register_backend(BF16_ONLY, _Bfloat16OnlyBackend)
    yield BF16_ONLY
    registry._USER.pop(BF16_ONLY, None)  # no public unregister; keep the registry clean


@pytest.mark.filterwarnings("ignore:fv_compile. CLI_TEST_BF16_ONLY cannot run")
def test_a_variant_whose_backend_served_no_site_says_so_instead_of_ok(bf16_only_backend, tmp_path):
    rc, stdout, _ = _main(
        "report", "--model", "wan-tiny", "--grid", "2,8,8", "--backends", bf16_only_backend,
        "--skip-torch-compile", *QUICK, "--out", str(tmp_path),
    )  # fmt: skip
    assert rc == 0  # measured: not a failure
    (fv,) = [
        v
        for v in json.loads((tmp_path / "report.json").read_text())["variants"]
        if v["kind"] == "fv_compile"
    ]
    assert fv["status"] == "served no site"
    assert f"{BF16_ONLY} ran none of the 4 site(s)" in fv["unserved_reason"]
    assert "dtype float32 (supported: bfloat16)" in fv["unserved_reason"]
    markdown = (tmp_path / "report.md").read_text()
    assert f"| fv_compile[{BF16_ONLY}] | served no site |" in markdown
    assert f"**fv_compile[{BF16_ONLY}]** served no site, so its numbers are another backend's" in (
        markdown
    )
    assert "served no site" in stdout


def test_a_variant_whose_backend_served_some_sites_stays_ok():
    served = AttentionSite("a", "sdpa", "BHSD", backend="TORCH_SDPA", status=REWRITTEN)
    other = AttentionSite("b", "sdpa", "BHSD", backend="FLASH_ATTN", status=REWRITTEN)
    assert unserved_reason("TORCH_SDPA", [served, other]) is None
    assert unserved_reason({"self": "auto", "cross": "TORCH_SDPA"}, [served]) is None
    assert unserved_reason("auto", [other]) is None
    assert "TORCH_SDPA ran none of the 1 site(s), FLASH_ATTN ran them" in (
        unserved_reason("TORCH_SDPA", [other]) or ""
    )
