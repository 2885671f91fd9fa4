"""`fv_compile.compile(model, accuracy_budget=...)`: `auto` choosing each site's backend by
measured error and time (fv_compile/tuning.py).

Timings are injected (`fv_compile.tuning.time_on_device` replaced), so the choice is decided by
numbers the test sets; errors are never injected: they come from running each candidate on the
site's real inputs. On the CPU, SAGE_ATTN and TRITON_ATTN run under the Triton interpreter
(tests/conftest.py); shapes are tiny."""

from __future__ import annotations

import json
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import fv_compile
from fv_compile import FvCompileError, tuning
from fv_compile.backends import registry
from fv_compile.backends.sdpa import SDPABackend, SDPAImpl
from tests.test_errors import ROWS, assert_unchanged, snapshot

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 0.01  # the relative error the deliberately inaccurate backend adds


class ScaledImpl(SDPAImpl):
    """Exact attention times (1 + EPS): relative L2 error EPS against any exact reference."""

    def forward(self, query, key, value, attn_metadata):
        return super().forward(query, key, value, attn_metadata) * (1 + EPS)


class ScaledBackend(SDPABackend):
    """A registered approximate backend: `auto` may take it only under a budget it meets."""

    differentiable = False
    approximate = True
    version = "1"

    @staticmethod
    def get_name():
        return "SCALED_ATTN"

    @staticmethod
    def get_impl_cls():
        return ScaledImpl


class TwoSites(torch.nn.Module):
    """Self-attention (SDPA) then cross-attention to 8 other tokens (matmul + softmax)."""

    def forward(self, q, k, v, text_k, text_v):
        a = F.scaled_dot_product_attention(q, k, v)
        w = (a @ text_k.transpose(-2, -1) * 0.125).softmax(-1)
        return w @ text_v


def two_site_inputs(dtype=torch.float32, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(1, 2, seq, 64)] * 3 + [(1, 2, 8, 64)] * 2
    return [torch.randn(*s, generator=g).to(DEVICE, dtype) for s in shapes]


class FakeTimes:
    """Per-backend seconds; records every timing asked for."""

    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds = seconds
        self.calls: list[tuple[str, str]] = []

    def __call__(self, run, device, *, backend, site):
        self.calls.append((backend, site.module_path or site.node))
        return self.seconds.get(backend, 1.0)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A tuning cache of this test's own: Inductor's cache root, where the tuner keeps it."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    return tmp_path / "fv_compile_tuning"


@pytest.fixture
def scaled(monkeypatch):
    monkeypatch.setitem(registry._USER, "SCALED_ATTN", ScaledBackend)
    return ScaledBackend


def timed(monkeypatch, **seconds: float) -> FakeTimes:
    fake = FakeTimes(seconds)
    monkeypatch.setattr(tuning, "time_on_device", fake)
    return fake


def run(cm, args, calls=1):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [cm(*args) for _ in range(calls)]


def choices(cm) -> list[str | None]:
    return [s.backend for s in cm.explain().sites]


FAST_SCALED = {"SCALED_ATTN": 1e-3, "TRITON_ATTN": 2e-3, "TORCH_SDPA": 3e-3, "SAGE_ATTN": 5e-3}


# -- the choice -----------------------------------------------------------------------------------


def test_the_fastest_candidate_within_budget_wins_and_runs_every_later_call(
    cache, scaled, monkeypatch
):
    timed(monkeypatch, **FAST_SCALED)
    model, args = TwoSites(), two_site_inputs()
    cm = fv_compile.compile(model, compiler="eager", accuracy_budget=0.05)
    first, second = run(cm, args, 2)
    assert choices(cm) == ["SCALED_ATTN", "SCALED_ATTN"]
    with torch.no_grad():
        want = model(*args)
    # the first call ran auto's exact default while measuring; later calls run the choice
    torch.testing.assert_close(first, want)
    rel = float((second - want).norm() / want.norm())
    assert rel > EPS / 2, "the later call did not run the chosen (scaled) backend"
    for site in cm.explain().sites:
        t = site.tuning
        assert t.choice == "SCALED_ATTN" and t.source == "measured" and t.budget == 0.05
        by_name = {c.backend: c for c in t.candidates}
        assert set(by_name) == {"TORCH_SDPA", "TRITON_ATTN", "SCALED_ATTN"}
        assert by_name["SCALED_ATTN"].qualifies and not by_name["SCALED_ATTN"].exact


def test_a_faster_candidate_over_budget_loses_to_the_fastest_exact_one(cache, scaled, monkeypatch):
    timed(monkeypatch, **FAST_SCALED)
    model, args = TwoSites(), two_site_inputs()
    cm = fv_compile.compile(model, compiler="eager", accuracy_budget=EPS / 2)
    run(cm, args, 2)
    assert choices(cm) == ["TRITON_ATTN", "TRITON_ATTN"]
    for site in cm.explain().sites:
        loser = next(c for c in site.tuning.candidates if c.backend == "SCALED_ATTN")
        assert not loser.qualifies and loser.time_s < 2e-3


@pytest.mark.parametrize("budget, wins", [(EPS * 0.8, False), (EPS * 1.25, True)])
def test_the_error_is_measured_on_the_sites_inputs(cache, scaled, monkeypatch, budget, wins):
    """The inaccurate backend declares nothing about its error: only running it shows EPS."""
    timed(monkeypatch, **FAST_SCALED)
    cm = fv_compile.compile(TwoSites(), compiler="eager", accuracy_budget=budget)
    run(cm, two_site_inputs())
    for site in cm.explain().sites:
        by_name = {c.backend: c for c in site.tuning.candidates}
        assert by_name["SCALED_ATTN"].rel_l2 == pytest.approx(EPS, rel=1e-3)
        assert by_name["TORCH_SDPA"].rel_l2 < 1e-5  # float32 SDPA against float32 SDPA
        assert by_name["SCALED_ATTN"].qualifies is wins
        assert site.backend == ("SCALED_ATTN" if wins else "TRITON_ATTN")


class FalselyExactBackend(ScaledBackend):
    """Declares its output dense attention, and is off by EPS: a broken kernel."""

    differentiable = True
    approximate = False

    @staticmethod
    def get_name():
        return "FALSELY_EXACT"


def test_an_exact_backend_that_computes_something_else_does_not_win_by_speed(cache, monkeypatch):
    monkeypatch.setitem(registry._USER, "FALSELY_EXACT", FalselyExactBackend)
    timed(monkeypatch, FALSELY_EXACT=1e-3, TRITON_ATTN=2e-3, TORCH_SDPA=3e-3)
    cm = _tune(budget=EPS / 2)  # below its error, and float32 rounding is far below too
    assert choices(cm) == ["TRITON_ATTN", "TRITON_ATTN"]
    assert "not exact at this site" in str(cm.explain())


class OneNaNImpl(SDPAImpl):
    """Exact attention but for one NaN: tiny relative error over the finite entries."""

    def forward(self, query, key, value, attn_metadata):
        out = super().forward(query, key, value, attn_metadata).clone()
        out[0, 0, 0, 0] = float("nan")
        return out


class OneNaNBackend(ScaledBackend):
    @staticmethod
    def get_name():
        return "ONE_NAN"

    @staticmethod
    def get_impl_cls():
        return OneNaNImpl


def test_a_candidate_with_nans_the_reference_lacks_loses_at_any_budget(cache, monkeypatch):
    monkeypatch.setitem(registry._USER, "ONE_NAN", OneNaNBackend)
    timed(monkeypatch, ONE_NAN=1e-3, TRITON_ATTN=2e-3, TORCH_SDPA=3e-3)
    cm = _tune(budget=1.0)
    assert choices(cm) == ["TRITON_ATTN", "TRITON_ATTN"]
    for site in cm.explain().sites:
        bad = next(c for c in site.tuning.candidates if c.backend == "ONE_NAN")
        assert not bad.nan_match and bad.rel_l2 < 1e-3 and not bad.qualifies
    assert "NaN/inf pattern differs" in str(cm.explain())


def test_budget_zero_admits_no_approximation_but_still_times_the_exact_backends(
    cache, scaled, monkeypatch
):
    timed(monkeypatch, **FAST_SCALED)
    cm = _tune(budget=0)
    assert choices(cm) == ["TRITON_ATTN", "TRITON_ATTN"]


def test_without_a_budget_nothing_is_measured_and_auto_stays_exact(cache, scaled, monkeypatch):
    fake = timed(monkeypatch, **FAST_SCALED)
    cm = fv_compile.compile(TwoSites(), compiler="eager")
    run(cm, two_site_inputs(), 2)
    assert cm._fv_backend.tuner is None and not fake.calls
    assert choices(cm) == ["TORCH_SDPA", "TORCH_SDPA"]
    assert all(s.tuning is None for s in cm.explain().sites)
    assert not cache.exists()
    assert "tuned" not in str(cm.explain())


def test_sites_the_user_named_are_not_tuned(cache, scaled, monkeypatch):
    timed(monkeypatch, **FAST_SCALED)
    cm = fv_compile.compile(
        TwoSites(), {"cross": "TORCH_SDPA"}, compiler="eager", accuracy_budget=0.05
    )
    run(cm, two_site_inputs(), 2)
    self_site, cross_site = cm.explain().sites
    assert self_site.backend == "SCALED_ATTN" and self_site.tuning is not None
    assert cross_site.backend == "TORCH_SDPA" and cross_site.tuning is None


def test_under_grad_only_differentiable_backends_are_candidates(cache, scaled, monkeypatch):
    timed(monkeypatch, **FAST_SCALED)
    args = two_site_inputs()
    args[0].requires_grad_(True)
    cm = fv_compile.compile(TwoSites(), compiler="eager", accuracy_budget=0.05)
    for _ in range(2):
        cm(*args).sum().backward()
    for site in cm.explain().sites:
        assert {c.backend for c in site.tuning.candidates} == {"TORCH_SDPA", "TRITON_ATTN"}
    assert choices(cm) == ["TRITON_ATTN", "TRITON_ATTN"]


# -- SAGE_ATTN, the approximate backend fv_compile ships --------------------------------------


@pytest.mark.parametrize("budget, sage", [(1e-3, False), (0.1, True)])
def test_sage_is_chosen_only_where_its_measured_error_fits(cache, monkeypatch, budget, sage):
    timed(monkeypatch, SAGE_ATTN=1e-3, TRITON_ATTN=2e-3, TORCH_SDPA=3e-3)
    model, args = TwoSites(), two_site_inputs(torch.bfloat16)
    cm = fv_compile.compile(model, compiler="eager", accuracy_budget=budget)
    out = run(cm, args, 2)[-1]
    want = "SAGE_ATTN" if sage else "TRITON_ATTN"
    assert choices(cm) == [want, want]
    for site in cm.explain().sites:
        measured = next(c for c in site.tuning.candidates if c.backend == "SAGE_ATTN")
        assert 1e-3 < measured.rel_l2 < 0.1, measured  # 8-bit: more than bf16's rounding
    with torch.no_grad():
        ref = model(*[a.double() for a in args])
    rel = float((out.double() - ref).norm() / ref.norm())
    assert rel < (0.1 if sage else 0.02), rel


# -- no recompilation, the model untouched ---------------------------------------------------


@pytest.mark.parametrize("compiler", ["eager", "aot_eager", "inductor"])
def test_a_loop_of_calls_tunes_once_and_compiles_once(cache, scaled, monkeypatch, compiler):
    fake = timed(monkeypatch, **FAST_SCALED)
    compiled = []
    original = fv_compile.api.FvCompileBackend.compile_graph

    def counting(self, gm, example_inputs):
        compiled.append(gm)
        return original(self, gm, example_inputs)

    monkeypatch.setattr(fv_compile.api.FvCompileBackend, "compile_graph", counting)
    model, args = TwoSites(), two_site_inputs()
    cm = fv_compile.compile(model, compiler=compiler, accuracy_budget=0.05)
    run(cm, args)
    timings = len(fake.calls)
    outs = run(cm, args, 5)
    backend = cm._fv_backend
    assert backend.graphs == 1 and len(compiled) == 1, "recompiled during the loop"
    assert backend.tuner.measured == 2 and len(fake.calls) == timings
    assert all(torch.equal(outs[0], o) for o in outs[1:]), "the choice changed between calls"
    ops = [n.args[4] for n in compiled[0].graph.nodes if "fv_compile.attention" in str(n.target)]
    assert [fv_compile.ops.site_runtime(sid).backend for sid in ops] == ["SCALED_ATTN"] * 2


def test_the_users_model_is_unchanged(cache, scaled, monkeypatch):
    timed(monkeypatch, **FAST_SCALED)
    from tests.test_errors import Net

    net = Net()
    before = snapshot(net)
    cm = fv_compile.compile(net, compiler="eager", accuracy_budget=0.05)
    x = torch.randn(2, 12, 32)
    run(cm, (x,), 3)
    assert_unchanged(net, before)


def test_regional_blocks_share_the_first_blocks_choice(cache, scaled, monkeypatch):
    timed(monkeypatch, **FAST_SCALED)
    from tests.test_errors import Net

    cm = fv_compile.compile(Net(), compiler="eager", regional=True, accuracy_budget=0.05)
    run(cm, (torch.randn(2, 12, 32),), 2)
    rows = cm.explain().sites
    assert [s.module_path for s in rows] == ["blocks.0", "blocks.1"]
    assert {s.backend for s in rows} == {"SCALED_ATTN"} and all(s.tuning for s in rows)


# -- the cache -----------------------------------------------------------------------------------


def test_a_second_process_reads_the_decisions_and_measures_nothing(cache, scaled, monkeypatch):
    fake = timed(monkeypatch, **FAST_SCALED)
    args = two_site_inputs()
    first = fv_compile.compile(TwoSites(), compiler="eager", accuracy_budget=0.05)
    run(first, args)
    assert len(list(cache.glob("*.json"))) == 2  # one entry per site
    fake.calls.clear()
    torch._dynamo.reset()
    second = fv_compile.compile(TwoSites(), compiler="eager", accuracy_budget=0.05)
    (out,) = run(second, args)
    assert second._fv_backend.tuner.measured == 0 and not fake.calls
    assert choices(second) == ["SCALED_ATTN", "SCALED_ATTN"]
    assert {s.tuning.source for s in second.explain().sites} == {"cache"}
    with torch.no_grad():  # the first call already runs the cached choice (both sites scaled)
        want = TwoSites()(*args)
    assert EPS / 2 < float((out - want).norm() / want.norm()) < 3 * EPS
    assert "from the tuning cache" in str(second.explain())


def _tune(budget=0.05, args=None, model_cls=TwoSites) -> fv_compile.CompiledModel:
    torch._dynamo.reset()
    cm = fv_compile.compile(model_cls(), compiler="eager", accuracy_budget=budget)
    run(cm, args if args is not None else two_site_inputs())
    return cm


@pytest.mark.parametrize(
    "change",
    ["shape", "dtype", "budget", "backend version", "model"],
)
def test_a_decision_is_reused_only_for_the_same_key(cache, scaled, monkeypatch, change):
    timed(monkeypatch, **FAST_SCALED)
    _tune()
    assert _tune().explain().sites[0].tuning.source == "cache"  # the same key hits
    args, budget, model_cls = two_site_inputs(), 0.05, TwoSites
    if change == "shape":
        args = two_site_inputs(seq=24)
    elif change == "dtype":
        args = two_site_inputs(torch.bfloat16)
    elif change == "budget":
        budget = 0.04
    elif change == "backend version":
        monkeypatch.setattr(ScaledBackend, "version", "2")
    else:  # the same sites in another model: its activations are not the first one's
        model_cls = type("OtherModel", (TwoSites,), {})
    cm = _tune(budget, args, model_cls)
    assert cm._fv_backend.tuner.measured == 2
    assert {s.tuning.source for s in cm.explain().sites} == {"measured"}


def _entries(cache):
    return sorted(cache.glob("*.json"))


@pytest.mark.parametrize("damage", ["truncated", "not json", "choice", "numbers", "key"])
def test_a_corrupt_or_stale_entry_is_ignored_and_rewritten(cache, scaled, monkeypatch, damage):
    timed(monkeypatch, **FAST_SCALED)
    _tune(budget=EPS / 2)  # TRITON_ATTN wins: SCALED_ATTN is over budget
    for path in _entries(cache):
        text = path.read_text()
        entry = json.loads(text)
        if damage == "truncated":
            path.write_text(text[: len(text) // 2])
            continue
        if damage == "not json":
            path.write_bytes(b"\x00\xff garbage")
            continue
        if damage == "choice":  # a choice its own numbers do not give
            entry["choice"] = "SCALED_ATTN"
        elif damage == "numbers":  # numbers doctored to make the choice look right
            entry["choice"] = "SCALED_ATTN"
            for c in entry["candidates"]:
                if c["backend"] == "SCALED_ATTN":
                    c["rel_l2"] = "oops"
        else:  # an entry written for another key, under this key's file name
            entry["key"]["budget"] = 0.5
            entry["choice"] = "SCALED_ATTN"
        path.write_text(json.dumps(entry))
    cm = _tune(budget=EPS / 2)
    assert cm._fv_backend.tuner.measured == 2 and cm._fv_backend.tuner.cache.rejected == 2
    assert choices(cm) == ["TRITON_ATTN", "TRITON_ATTN"]
    for path in _entries(cache):  # rewritten whole, with the measured decision
        assert json.loads(path.read_text())["choice"] == "TRITON_ATTN"
    assert _tune(budget=EPS / 2)._fv_backend.tuner.measured == 0


def test_the_cache_lives_under_inductors_cache_root(cache, scaled, monkeypatch):
    timed(monkeypatch, **FAST_SCALED)
    _tune()
    (entry, *_) = _entries(cache)
    assert os.path.dirname(entry) == str(cache)
    key = json.loads(entry.read_text())["key"]
    assert key["dtype"] == "float32" and key["budget"] == 0.05 and key["grad"] is False
    from importlib.metadata import version

    assert key["packages"]["torch"] == version("torch") and "triton" in key["packages"]
    assert key["fv_compile"] == fv_compile.cache.source_key()
    assert key["model"].endswith("TwoSites") and key["mask"] is None
    assert {json.loads(e.read_text())["key"]["site"] for e in _entries(cache)} == {"a", "w"}
    assert set(key["backends"]) == {"TORCH_SDPA", "TRITON_ATTN", "SCALED_ATTN"}


# -- explain ---------------------------------------------------------------------------------------


def test_explain_lists_every_candidates_error_and_time_and_the_choice(cache, scaled, monkeypatch):
    timed(monkeypatch, **FAST_SCALED)
    cm = _tune(budget=EPS / 2)
    text = str(cm.explain())
    assert "accuracy budget 0.005" in text and "tuned" in text
    for name in ("TORCH_SDPA", "TRITON_ATTN", "SCALED_ATTN"):
        assert name in text
    assert "over budget 0.005" in text and "<- chosen" in text and "2 ms" in text
    row = cm.explain().to_dict()["sites"][0]["tuning"]
    assert row["choice"] == "TRITON_ATTN" and len(row["candidates"]) == 3
    scaled_row = next(c for c in row["candidates"] if c["backend"] == "SCALED_ATTN")
    assert math.isclose(scaled_row["rel_l2"], EPS, rel_tol=1e-3)


# -- bad values ----------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [-0.01, 1.5, float("nan"), float("inf"), "0.02", True])
def test_a_bad_budget_is_the_documented_error(budget):
    net = TwoSites()
    with pytest.raises(FvCompileError) as info:
        fv_compile.compile(net, accuracy_budget=budget)
    assert info.match(ROWS["accuracy-budget"].regex())


def test_torch_compile_takes_the_budget_as_an_fv_compile_option(cache, scaled, monkeypatch):
    timed(monkeypatch, **FAST_SCALED)
    fn = torch.compile(
        TwoSites(),
        backend="fv_compile",
        options={"accuracy_budget": 0.05, "compiler": "eager"},
        dynamic=False,
    )
    args = two_site_inputs()
    with torch.no_grad():
        fn(*args)
        out = fn(*args)
        want = TwoSites()(*args)
    assert EPS / 2 < float((out - want).norm() / want.norm()) < 3 * EPS


# -- the report ------------------------------------------------------------------------------------


def test_the_report_runs_auto_under_the_budget_and_lists_its_sites_candidates(cache, tmp_path):
    import contextlib
    import io

    from fv_compile.cli import main

    out = tmp_path / "report"
    argv = [
        "report", "--model", "wan-tiny", "--grid", "2,8,8", "--compiler", "eager",
        "--device", "cpu", "--backends", "auto", "--accuracy-budget", "0.05", "--steps", "1",
        "--warmup", "0", "--repeat", "1", "--skip-torch-compile", "--skip-warm-compile",
        "--no-plot", "--out", str(out),
    ]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(argv) == 0
    variants = {v["name"]: v for v in json.loads((out / "report.json").read_text())["variants"]}
    tuned = variants["fv_compile[auto, budget 0.05]"]
    assert all(s["tuning"] is None for s in variants["fv_compile[auto]"]["explain"]["sites"])
    rewritten = [s for s in tuned["explain"]["sites"] if s["status"] == "rewritten"]
    assert rewritten and all(s["tuning"]["budget"] == 0.05 for s in rewritten)
    assert all(s["tuning"]["choice"] == s["backend"] for s in rewritten)
    markdown = (out / "report.md").read_text()
    assert "accuracy budget 0.05" in markdown and "**accuracy budget**" in markdown


def test_the_report_refuses_a_bad_budget_before_running(tmp_path, capsys):
    from fv_compile.cli import main

    argv = ["report", "--model", "wan-tiny", "--accuracy-budget", "2", "--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        main(argv)
    assert "accuracy_budget must be None or a relative L2 error" in capsys.readouterr().err


# -- beside a backend with per-step metadata ---------------------------------------------------


class StaThenCross(torch.nn.Module):
    """Video self-attention (routed to sliding tile attention) then cross-attention to text."""

    def forward(self, x, text):
        a = F.scaled_dot_product_attention(x, x, x)
        return F.scaled_dot_product_attention(a, text, text)


def test_sites_left_to_auto_are_tuned_beside_a_metadata_backend(cache, scaled, monkeypatch):
    from tests.test_sliding_tile import GRID, batch, sta_args

    timed(monkeypatch, **FAST_SCALED)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, GRID[0] * GRID[1] * GRID[2], 16, generator=g)
    text = torch.randn(1, 2, 8, 16, generator=g)
    policy = {"self": "SLIDING_TILE_ATTN"}
    args = sta_args(sta_window=(1, 1, 1))

    def steps(cm, n):
        outs = []
        for step in range(n):
            with fv_compile.forward_context(step, batch(), args):
                outs += run(cm, (x, text))
        return outs

    plain = fv_compile.compile(StaThenCross(), policy, compiler="eager")
    want = steps(plain, 1)[0]
    with torch.no_grad():  # (the window is narrower than the grid: STA is not dense here)
        assert not torch.allclose(want, StaThenCross()(x, text), atol=1e-3)
    torch._dynamo.reset()
    cm = fv_compile.compile(StaThenCross(), policy, compiler="eager", accuracy_budget=0.05)
    first, second, third = steps(cm, 3)
    torch.testing.assert_close(
        first, want
    )  # STA ran on the first call too, cross on auto's default
    sta_site, cross_site = cm.explain().sites
    assert sta_site.backend == "SLIDING_TILE_ATTN" and sta_site.tuning is None
    assert cross_site.backend == "SCALED_ATTN" and cross_site.tuning.source == "measured"
    torch.testing.assert_close(second, want * (1 + EPS))  # the cross site's output, scaled
    torch.testing.assert_close(third, second)
    assert cm._fv_backend.graphs == 1 and cm._fv_backend.tuner.measured == 1


def test_a_second_process_starts_from_the_cache(cache):
    """Two real processes, one cache root: the second measures nothing, runs the same choices."""
    import subprocess
    import sys

    probe = os.path.join(os.path.dirname(__file__), "_tuning_probe.py")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache.parent)}
    runs = [
        json.loads(
            subprocess.run(
                [sys.executable, probe], env=env, capture_output=True, text=True, check=True
            ).stdout.splitlines()[-1]
        )
        for _ in range(2)
    ]
    assert runs[0]["measured"] == 2 and runs[0]["sources"] == ["measured", "measured"]
    assert runs[1]["measured"] == 0 and runs[1]["sources"] == ["cache", "cache"]
    assert runs[1]["choices"] == runs[0]["choices"]


class PaddedSelf(torch.nn.Module):
    def forward(self, q, k, v, keep):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])


def test_a_masked_site_is_measured_with_its_mask(cache, scaled, monkeypatch):
    timed(monkeypatch, **FAST_SCALED)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 16, 64, generator=g).to(DEVICE) for _ in range(3))
    keep = torch.ones(2, 16, dtype=torch.bool, device=DEVICE)
    keep[0, 10:] = False
    keep[1] = False  # batch element 1 attends no key: its rows are what eager gives them
    model = PaddedSelf()
    cm = fv_compile.compile(model, compiler="eager", accuracy_budget=0.05)
    out = run(cm, (q, k, v, keep), 2)[-1]
    (site,) = cm.explain().sites
    by_name = {c.backend: c for c in site.tuning.candidates}
    assert set(by_name) == {"TORCH_SDPA", "TRITON_ATTN", "SCALED_ATTN"}  # key padding kinds
    assert by_name["TORCH_SDPA"].rel_l2 < 1e-5 and by_name["TRITON_ATTN"].rel_l2 < 1e-3
    assert by_name["SCALED_ATTN"].rel_l2 == pytest.approx(EPS, rel=1e-3)
    assert site.backend == "SCALED_ATTN"
    with torch.no_grad():
        want = model(q, k, v, keep)
    torch.testing.assert_close(out, want * (1 + EPS), equal_nan=True)


# -- fv_compile.explain and `fv-compile explain` ------------------------------------------------


def test_explain_tunes_and_a_compile_afterwards_measures_nothing(cache, scaled, monkeypatch):
    fake = timed(monkeypatch, **FAST_SCALED)
    args = two_site_inputs()
    report = fv_compile.explain(TwoSites(), *args, accuracy_budget=0.05)
    assert [s.backend for s in report.sites] == ["SCALED_ATTN", "SCALED_ATTN"]
    assert {s.tuning.source for s in report.sites} == {"measured"}
    assert "accuracy budget 0.05" in str(report) and report.uncaptured_calls == 0
    fake.calls.clear()
    torch._dynamo.reset()
    cm = fv_compile.compile(TwoSites(), compiler="eager", accuracy_budget=0.05)
    run(cm, args)
    assert cm._fv_backend.tuner.measured == 0 and not fake.calls
    assert choices(cm) == ["SCALED_ATTN", "SCALED_ATTN"]


class SelfOnly(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def test_explain_with_verify_checks_the_tuned_choices(cache, scaled, monkeypatch):
    timed(monkeypatch, **FAST_SCALED)
    report = fv_compile.explain(TwoSites(), *two_site_inputs(), accuracy_budget=0.05, verify=True)
    assert [s.backend for s in report.sites] == ["SCALED_ATTN", "SCALED_ATTN"]
    for site in report.sites:  # the check ran the scaled backend: float32's tolerance fails it
        assert site.tuning.source == "cache"
        assert site.check.output.rel_l2 == pytest.approx(EPS, rel=1e-2)
    assert not report.verified


def test_the_explain_command_takes_a_budget(cache, capsys):
    from fv_compile.cli import main

    argv = ["explain", "--model", "wan-tiny", "--grid", "2,8,8", "--device", "cpu"]
    assert main([*argv, "--accuracy-budget", "0.05"]) == 0
    assert "accuracy budget 0.05" in capsys.readouterr().out


class RaisingImpl(SDPAImpl):
    def forward(self, query, key, value, attn_metadata):
        raise torch.OutOfMemoryError("the test's reference ran out of memory")


class RaisingBackend(SDPABackend):
    @staticmethod
    def get_name():
        return "RAISING_REFERENCE"

    @staticmethod
    def get_impl_cls():
        return RaisingImpl


def test_a_site_whose_reference_cannot_run_stays_on_the_default_uncached(
    cache, scaled, monkeypatch
):
    timed(monkeypatch, **FAST_SCALED)
    monkeypatch.setitem(registry._USER, "RAISING_REFERENCE", RaisingBackend)
    monkeypatch.setattr(tuning, "_REFERENCE", "RAISING_REFERENCE")
    model, args = TwoSites(), two_site_inputs()
    cm = fv_compile.compile(model, compiler="eager", accuracy_budget=0.05)
    outs = run(cm, args, 2)
    with torch.no_grad():
        want = model(*args)
    for out in outs:
        torch.testing.assert_close(out, want)
    assert choices(cm) == ["TORCH_SDPA", "TORCH_SDPA"]
    assert {s.tuning.source for s in cm.explain().sites} == {"unmeasured"}
    assert "the float32 reference failed (OutOfMemoryError" in str(cm.explain())
    assert not _entries(cache)


def test_sequence_parallel_sites_run_their_tuned_backend(cache, scaled, monkeypatch):
    import torch.distributed as dist

    from fv_compile.distributed import ulysses

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed gloo")
    timed(monkeypatch, **FAST_SCALED)
    from torch._subclasses.fake_tensor import FakeTensor

    backends = []
    real = ulysses.sharded_sequence_parallel_attention

    def counted(*args, **kwargs):
        if not isinstance(args[0], FakeTensor):  # (the sharding pass checks it on fakes)
            backends.append(fv_compile.ops.site_runtime(args[4]).backend)
        return real(*args, **kwargs)

    # every sequence-parallel site runs through it, on its share or on replicated tokens
    monkeypatch.setattr(ulysses, "sharded_sequence_parallel_attention", counted)
    model, args = SelfOnly(), two_site_inputs()[:3]
    backend = "nccl" if DEVICE == "cuda" else "gloo"  # (gloo's all-gather crashes on CUDA)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        cm = fv_compile.compile(model, compiler="eager", sequence_parallel=1, accuracy_budget=0.05)
        first, second = run(cm, args, 2)
    finally:
        dist.destroy_process_group()
    with torch.no_grad():
        want = model(*args)
    torch.testing.assert_close(first, want)  # measured on the unsharded graph: the default
    torch.testing.assert_close(second, want * (1 + EPS))
    assert backends == ["SCALED_ATTN"]  # only the compiled (sharded) graph's call


def test_a_dropped_tuned_model_takes_its_sites_with_it(cache, scaled, monkeypatch):
    import gc

    from fv_compile import ops

    timed(monkeypatch, **FAST_SCALED)
    gc.collect()
    before = set(ops._SITES)
    cm = fv_compile.compile(TwoSites(), compiler="eager", accuracy_budget=0.05)
    run(cm, two_site_inputs(), 2)
    assert set(ops._SITES) - before  # the tuned graph's sites, registered while it lives
    del cm  # (no torch._dynamo.reset(): the compiled model releases its own code)
    gc.collect()
    assert set(ops._SITES) - before == set()
