"""Compiled models that share a process do not share state: two backends side by side, two threads
under different forward contexts, and a model compiled, freed and compiled again."""

from __future__ import annotations

import gc
import threading
import warnings
import weakref

import pytest
import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

import fv_compile
from fv_compile import FastVideoArgs, ForwardBatch
from fv_compile.backends.sliding_tile import SlidingTileMetadataBuilder
from tests.test_sliding_tile import GRID, TILE, Block, VideoDiT, definition_mask

WINDOWS = ((1, 1, 1), (3, 2, 3))  # two STA windows whose outputs differ
ITERATIONS = 25


def sta_args(window):
    return FastVideoArgs(patch_size=(1, 1, 1), sta_tile_size=TILE, sta_window=window)


def batch():
    return ForwardBatch(raw_latent_shape=(1, 4, *GRID))


def video(seed=0):
    return torch.randn(
        1, GRID[0] * GRID[1] * GRID[2], 32, generator=torch.Generator().manual_seed(seed)
    )


def sta_reference(model, x, window):
    mask = definition_mask(GRID, TILE, window)
    with torch.no_grad():
        return model(x, masks=[mask] * len(model.blocks))


def run(cm, x, window, step=0):
    with torch.no_grad(), fv_compile.forward_context(step, batch(), sta_args(window)):
        return cm(x)


def test_two_compiled_models_with_different_backends_run_side_by_side():
    model = VideoDiT().eval()
    dense = fv_compile.compile(model, "TORCH_SDPA", compiler="eager")
    sparse = fv_compile.compile(model, "SLIDING_TILE_ATTN", compiler="eager")
    other = VideoDiT().eval()  # a second model of the same class, on STA with another window
    sparse_other = fv_compile.compile(other, "SLIDING_TILE_ATTN", compiler="eager")
    x = video()
    with torch.no_grad():
        eager = model(x)
    want = sta_reference(model, x, WINDOWS[0])
    want_other = sta_reference(other, x, WINDOWS[1])
    for _ in range(3):  # interleaved, each under its own context
        torch.testing.assert_close(run(dense, x, WINDOWS[0]), eager, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(run(sparse, x, WINDOWS[0]), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            run(sparse_other, x, WINDOWS[1]), want_other, atol=1e-5, rtol=1e-5
        )
    assert {s.backend for s in dense.explain().sites} == {"TORCH_SDPA"}
    assert {s.backend for s in sparse.explain().sites} == {"SLIDING_TILE_ATTN"}
    assert (
        dense._fv_backend.graphs,
        sparse._fv_backend.graphs,
        sparse_other._fv_backend.graphs,
    ) == (1, 1, 1)
    assert dense.variants_compiled == 0 and sparse.variants_compiled == 1


@pytest.mark.parametrize(
    "shared", [False, True], ids=["a-model-per-thread", "one-model-both-threads"]
)
def test_threads_under_different_forward_contexts_see_only_their_own_metadata(shared, monkeypatch):
    model = VideoDiT().eval()
    compiled = [
        fv_compile.compile(model, "SLIDING_TILE_ATTN", compiler="eager")
        for _ in range(1 if shared else 2)
    ]
    models = [compiled[0], compiled[0]] if shared else compiled
    inputs = [video(1), video(2)]
    wants = [sta_reference(model, x, w) for x, w in zip(inputs, WINDOWS)]
    assert (
        wants[0] - sta_reference(model, inputs[0], WINDOWS[1])
    ).abs().max() > 1e-3  # a mix-up would show
    for cm, x, window in zip(
        models, inputs, WINDOWS
    ):  # Dynamo's first compile is not thread-safe: warm up
        run(cm, x, window)

    seen: dict[int, set[tuple[int, tuple]]] = {0: set(), 1: set()}
    build = SlidingTileMetadataBuilder.build

    def recording(self, current_timestep, forward_batch, fastvideo_args):
        seen[threading.current_thread().index].add(
            (current_timestep, tuple(fastvideo_args.sta_window))
        )
        return build(self, current_timestep, forward_batch, fastvideo_args)

    monkeypatch.setattr(SlidingTileMetadataBuilder, "build", recording)
    start = threading.Barrier(2)
    outs: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    errors: list[BaseException] = []

    def worker(i):
        threading.current_thread().index = i
        try:
            start.wait()
            for _ in range(ITERATIONS):
                outs[i].append(run(models[i], inputs[i], WINDOWS[i], step=i))
        except BaseException as e:  # re-raised below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(2):
        assert len(outs[i]) == ITERATIONS
        for out in outs[i]:
            torch.testing.assert_close(out, wants[i], atol=1e-5, rtol=1e-5)
        assert seen[i] == {(i, WINDOWS[i])}, f"thread {i}'s builder saw {seen[i]}"
    variants = sum(cm.variants_compiled for cm in compiled)
    assert variants == 2  # one per window width, compiled in the warm-up, none in the threads


class GluedDiT(VideoDiT):
    """Calls `glue()` in the eager code between its (regionally compiled) blocks."""

    glue = staticmethod(lambda: None)

    def forward(self, x, text=None, masks=None):
        x = x + self.blocks[0](x, None)
        type(self).glue()
        return x + self.blocks[1](x, None)


def test_a_call_in_another_thread_is_an_outermost_call_of_its_own(monkeypatch):
    """Each outermost call of a CUDA-graph model marks a step: a call running in another thread
    does not make this thread's call a nested one."""
    marked = []
    monkeypatch.setattr(
        torch.compiler, "cudagraph_mark_step_begin", lambda: marked.append(threading.get_ident())
    )
    inside, release = threading.Event(), threading.Event()

    def wait():
        if threading.current_thread() is not threading.main_thread():
            inside.set()
            assert release.wait(30)

    monkeypatch.setattr(GluedDiT, "glue", staticmethod(wait))
    models = [
        fv_compile.compile(GluedDiT().eval(), "TORCH_SDPA", compiler="eager") for _ in range(2)
    ]
    for cm in models:
        object.__setattr__(
            cm, "_cuda_graphs", True
        )  # as under mode="reduce-overhead" (CPU tensors: no copies)
    x = video()
    worker = threading.Thread(target=lambda: run(models[0], x, WINDOWS[0]))
    worker.start()
    try:
        assert inside.wait(30)  # the worker's call is in progress
        run(models[1], x, WINDOWS[0])
    finally:
        release.set()
        worker.join()
    assert marked.count(threading.main_thread().ident) == 1 and len(marked) == 2


def test_a_model_compiled_freed_and_compiled_again_compiles_afresh_and_leaks_no_entries():
    model = VideoDiT().eval()
    x = video()
    want_sta = sta_reference(model, x, WINDOWS[0])
    with torch.no_grad():
        want_dense = model(x)
    backends = []
    for i in range(4):
        name = ("SLIDING_TILE_ATTN", "TORCH_SDPA")[i % 2]
        cm = fv_compile.compile(model, name, compiler="eager", regional=False)
        out = run(cm, x, WINDOWS[0])
        torch.testing.assert_close(
            out, want_sta if name == "SLIDING_TILE_ATTN" else want_dense, atol=1e-5, rtol=1e-5
        )
        assert cm._fv_backend.graphs == 1, f"compile #{i + 1} reused another compile's graph"
        assert {s.backend for s in cm.explain().sites} == {name}
        backends.append(weakref.ref(cm._fv_backend))
        del cm, out
        gc.collect()
        assert backends[-1]() is None, f"compile #{i + 1} is still alive after del"
    for code in (
        VideoDiT.forward,
        Block.forward,
    ):  # the freed compiles left nothing on the model's code
        assert len(_debug_get_cache_entry_list(code)) == 0
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # and the model itself runs as before, eagerly
        torch.testing.assert_close(model(x), want_dense)


def test_threads_running_their_own_loops_on_one_model_count_their_own_steps():
    """No forward context: the step comes from each call's timestep. Two loops on one compiled
    model, in two threads, strictly interleaved: each counts 0, 1, 2 (one counter shared by the
    threads would see thread B's 700 after A's 600 as a new loop, step 0)."""
    from fv_compile.models import build_model, example_inputs

    model = build_model("wan-tiny").eval()
    args, kwargs = example_inputs(model)
    latent, _, text = args
    cm = fv_compile.compile(model, "TORCH_SDPA", compiler="eager")
    loops = {"a": (900.0, 600.0, 300.0), "b": (950.0, 700.0, 400.0)}
    turns = [threading.Semaphore(1), threading.Semaphore(0)]  # a, b, a, b, ...
    steps: dict[str, list[int]] = {"a": [], "b": []}

    def loop(name: str, me: int) -> None:
        for t in loops[name]:
            turns[me].acquire()
            steps[name].append(
                cm._derive.for_call(
                    (latent, torch.tensor([t]), text), dict(kwargs)
                )().current_timestep
            )
            turns[1 - me].release()

    threads = [threading.Thread(target=loop, args=(name, i)) for i, name in enumerate(loops)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert steps == {"a": [0, 1, 2], "b": [0, 1, 2]}
