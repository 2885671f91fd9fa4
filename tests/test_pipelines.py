"""diffusers pipelines as they are: `pipe.transformer = fv_compile.compile(pipe.transformer)`, then
`pipe(...)`, with no forward context; and what the compiled model derives from its own calls."""

import inspect
import pickle

import pytest
import torch
import torch.nn.functional as F

import fv_compile
from fv_compile import FastVideoArgs, FvCompileError
from fv_compile.backends.sliding_tile import SlidingTileMetadataBuilder
from fv_compile.pipelines import StepClock

diffusers = pytest.importorskip("diffusers")


def tiny_wan_pipeline():
    """A WanPipeline with random weights small enough for the CPU; no text encoder (the test
    passes prompt embeddings), nothing downloaded."""
    if not hasattr(diffusers, "WanPipeline") or "dummy" in diffusers.WanPipeline.__module__:
        pytest.skip("diffusers' WanPipeline needs transformers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(
        base_dim=3,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        rope_max_seq_len=32,
    ).eval()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0)
    pipe = diffusers.WanPipeline(
        tokenizer=None, text_encoder=None, transformer=transformer, vae=vae, scheduler=scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


PROMPT = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(1))
NEGATIVE = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(2))
STEPS = 4


def generate(pipe, **kw):
    """A 9-frame 64x64 video: latent grid (3, 8, 8), 48 tokens of patch (1, 2, 2); CFG on."""
    return pipe(
        prompt_embeds=PROMPT,
        negative_prompt_embeds=NEGATIVE,
        height=64,
        width=64,
        num_frames=9,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        **kw,
    ).frames


@pytest.fixture(scope="module")
def pipe_and_reference():
    pipe = tiny_wan_pipeline()
    return pipe, generate(pipe)


def test_compiled_transformer_runs_in_the_pipeline_unchanged(pipe_and_reference):
    pipe, reference = pipe_and_reference
    transformer = pipe.transformer
    try:
        pipe.transformer = fv_compile.compile(transformer, "TORCH_SDPA", compiler="aot_eager")
        assert pipe.config.transformer == (
            "diffusers",
            "WanTransformer3DModel",
        )  # not "CompiledModel"
        video = generate(pipe)
        torch.testing.assert_close(video, reference, atol=1e-4, rtol=1e-4)
        report = pipe.transformer.explain()
        assert [s.status for s in report.sites] == [
            "rewritten"
        ] * 4 and report.graphs == 1  # regional
    finally:
        pipe.transformer = transformer


def test_sta_in_a_pipeline_runs_dense_steps_then_sparse_ones(pipe_and_reference, monkeypatch):
    """sta_dense_steps=2 of 4: the first two steps dense, then sliding tiles; the builder runs
    once per step (the CFG pass shares the metadata)."""
    pipe, reference = pipe_and_reference
    transformer = pipe.transformer
    built = []
    build = SlidingTileMetadataBuilder.build

    def spy(self, current_timestep, forward_batch, fastvideo_args):
        md = build(self, current_timestep, forward_batch, fastvideo_args)
        built.append((current_timestep, tuple(forward_batch.raw_latent_shape), md.dense))
        return md

    monkeypatch.setattr(SlidingTileMetadataBuilder, "build", spy)
    policy = {"self": "SLIDING_TILE_ATTN", "default": "TORCH_SDPA"}
    try:
        for dense_steps in (2, STEPS):
            built.clear()
            args = FastVideoArgs(
                sta_tile_size=(1, 2, 2), sta_window=(1, 1, 1), sta_dense_steps=dense_steps
            )
            pipe.transformer = fv_compile.compile(
                transformer, policy, compiler="eager", fastvideo_args=args
            )
            video = generate(pipe)
            assert [(step, dense) for step, _, dense in built] == [
                (i, i < dense_steps) for i in range(STEPS)
            ]
            assert {shape for _, shape, _ in built} == {
                (1, 4, 3, 8, 8)
            }  # patch (1, 2, 2) from the config
            if dense_steps == STEPS:  # every step dense: the dense pipeline's video
                torch.testing.assert_close(video, reference, atol=1e-4, rtol=1e-4)
            else:
                assert pipe.transformer.variants_compiled == 2  # a dense and a sparse variant
                assert (video - reference).abs().max() > 1e-3  # the sparse steps changed it
    finally:
        pipe.transformer = transformer


# -- standing in for the model --------------------------------------------------------------------


def tiny_transformer():
    torch.manual_seed(0)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        rope_max_seq_len=32,
    ).eval()


def test_the_compiled_model_stands_in_for_the_module():
    model = tiny_transformer()
    cm = fv_compile.compile(model, "TORCH_SDPA", compiler="eager")
    assert isinstance(cm, torch._dynamo.eval_frame.OptimizedModule)  # what libraries unwrap
    assert cm._orig_mod is model and cm.config is model.config
    assert (cm.dtype, cm.device) == (torch.float32, torch.device("cpu"))
    assert list(cm.state_dict()) == list(model.state_dict())  # the model's keys, no _orig_mod.
    assert sum(1 for _ in cm.parameters()) == sum(1 for _ in model.parameters())
    cm.eval()
    assert not model.training and not cm.training
    cm.train()
    assert model.training
    cm.some_flag = 3  # set on the model, as OptimizedModule does
    assert model.some_flag == 3 and "some_flag" not in cm.__dict__
    with pytest.raises(FvCompileError, match="cannot be pickled"):
        pickle.dumps(cm)
    with pytest.raises(FvCompileError, match=r"already an fv_compile\.CompiledModel"):
        fv_compile.compile(cm)


def test_state_dict_round_trips_through_the_compiled_model_and_a_parent():
    model, other = tiny_transformer(), tiny_transformer()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    cm = fv_compile.compile(model, "TORCH_SDPA", compiler="eager")
    assert cm.load_state_dict(other.state_dict()).missing_keys == []
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values())
    )
    parent = torch.nn.ModuleDict({"transformer": cm})
    plain = torch.nn.ModuleDict({"transformer": tiny_transformer()})
    assert list(parent.state_dict()) == list(plain.state_dict())
    parent.load_state_dict(plain.state_dict())  # strict: every key found
    assert torch.equal(model.proj_out.weight, plain["transformer"].proj_out.weight)


def test_hooks_dtype_moves_and_attributes_set_after_compile_reach_every_call():
    model = tiny_transformer()
    cm = fv_compile.compile(model, "TORCH_SDPA", compiler="eager")
    latent, t, text = torch.randn(1, 4, 2, 4, 4), torch.tensor([500]), torch.randn(1, 3, 16)
    seen = []
    cm.register_forward_hook(lambda m, a, o: seen.append("wrapper"))
    model.register_forward_hook(lambda m, a, o: seen.append("model"))  # after compile: still runs
    model.blocks[0].register_forward_pre_hook(lambda m, a: seen.append("block"))
    with torch.no_grad():
        out = cm(latent, t, text, return_dict=False)[0]
        torch.testing.assert_close(out, model(latent, t, text, return_dict=False)[0])
    assert seen[:3] == ["block", "model", "wrapper"]
    cm.to(torch.float64)
    assert model.proj_out.weight.dtype == torch.float64 and cm.dtype == torch.float64


def test_cache_context_gives_the_step_index_to_the_derived_context():
    model = tiny_transformer()
    params = inspect.signature(model.cache_context).parameters.values()
    if not any(p.name == "step_index" or p.kind is p.VAR_KEYWORD for p in params):
        pytest.skip("this diffusers' cache_context takes no step_index (its pipelines pass none)")
    cm = fv_compile.compile(model, "TORCH_SDPA", compiler="eager")
    latent, t, text = torch.randn(1, 4, 2, 4, 4), torch.tensor([500]), torch.randn(1, 3, 16)
    resolve = None
    with cm.cache_context("cond", step_index=7):
        resolve = cm._derive.for_call((latent,), {"timestep": t, "encoder_hidden_states": text})
        with torch.no_grad():
            cm(latent, t, text)  # the model's own cache_context ran too
    ctx = resolve()
    assert ctx.current_timestep == 7 and tuple(ctx.forward_batch.raw_latent_shape) == (
        1,
        4,
        2,
        4,
        4,
    )
    assert tuple(ctx.fastvideo_args.patch_size) == (1, 2, 2)


# -- the step and the latent grid of calls without a context --------------------------------------


def test_step_clock_counts_timesteps_per_loop_and_cfg_passes_share_a_step():
    clock = StepClock()
    ts = torch.tensor([999.0, 800.0, 600.0])
    steps = []
    for _loop in range(2):
        for t in ts:
            timestep = t.expand(2)
            steps.append(clock.step_of(timestep))
            steps.append(clock.step_of(timestep))  # the CFG pass: the same tensor, no read
    assert steps == [0, 0, 1, 1, 2, 2] * 2
    assert [clock.step_of(torch.tensor([v])) for v in (990.0, 990.0, 3.0)] == [
        0,
        0,
        1,
    ]  # higher: a new loop
    assert [StepClock().step_of(v) for v in (1.0, 2.0)] == [0, 0]  # plain numbers too


def test_a_zoo_model_with_sta_needs_no_context():
    """STA on a reference model, called as a loop does (timestep per step, CFG twice per step,
    a batch-2 CFG call): one build per step, the dense step, then the sparse ones."""
    from fv_compile.models import build_model, example_inputs

    model = build_model("wan-tiny").eval()
    args, kwargs = example_inputs(model)
    latent, _, text = args
    grid = latent.shape[2:]
    tile = tuple(max(1, g // p // 2) for g, p in zip(grid, model.config.patch_size))
    fva = FastVideoArgs(sta_tile_size=tile, sta_window=(1, 1, 1), sta_dense_steps=1)
    cm = fv_compile.compile(
        model,
        {"self": "SLIDING_TILE_ATTN", "default": "TORCH_SDPA"},
        compiler="eager",
        fastvideo_args=fva,
    )
    derived = []
    with torch.no_grad():
        for t in (900, 600, 300):
            timestep = torch.tensor([t])
            derived.append(cm(latent, timestep, text, **kwargs))
            cm(latent, timestep, torch.zeros_like(text), **kwargs)
        cm(
            latent.expand(2, *latent.shape[1:]),
            torch.tensor([100, 100]),
            text.expand(2, *text.shape[1:]),
            **kwargs,
        )
        assert cm._derive.made == 4  # steps 0, 1, 2, and 3 (a new batch shape)
        batch = fv_compile.ForwardBatch(raw_latent_shape=latent.shape)
        for step, t in enumerate((900, 600, 300)):  # an explicit context wins, and agrees
            with fv_compile.forward_context(step, batch, fva):
                torch.testing.assert_close(
                    cm(latent, torch.tensor([t]), text, **kwargs), derived[step]
                )
        assert cm._derive.made == 4
        dense = model(latent, torch.tensor([900]), text, **kwargs)
    torch.testing.assert_close(derived[0], dense, atol=1e-5, rtol=1e-5)  # step 0: dense
    assert (
        derived[1] - model(latent, torch.tensor([600]), text, **kwargs)
    ).abs().max() > 1e-4  # sparse
    assert cm.variants_compiled == 3  # dense and sparse; batch 2 is a graph of its own (sparse)
    assert fva.patch_size is None  # the caller's args were copied, never filled in


def test_calls_without_what_a_backend_needs_say_how_to_fix_them():
    class NoLatent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(8, 24)

        def forward(self, tokens, timestep=None):
            q, k, v = self.qkv(tokens).view(1, -1, 3, 2, 4).unbind(2)
            return F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            )

    fva = FastVideoArgs(patch_size=(1, 1, 1), sta_tile_size=(1, 2, 2), sta_window=(1, 1, 1))
    cm = fv_compile.compile(NoLatent(), "SLIDING_TILE_ATTN", compiler="eager", fastvideo_args=fva)
    with (
        torch.no_grad(),
        pytest.raises(
            FvCompileError, match=r"(?s)no timestep argument.*with fv_compile\.forward_context"
        ),
    ):
        cm(torch.randn(1, 16, 8))
    with (
        torch.no_grad(),
        pytest.raises(FvCompileError, match="SLIDING_TILE_ATTN needs the latent shape"),
    ):
        cm(torch.randn(1, 16, 8), timestep=torch.tensor([900.0]))  # a step, but no latent
    for bad, match in (
        ({"sta_window": (1, 1)}, "three positive"),
        ({"sta_dense_steps": -1}, "int >= 0"),
    ):
        with pytest.raises(FvCompileError, match=match):
            fv_compile.compile(NoLatent(), fastvideo_args=FastVideoArgs(**bad))
    with pytest.raises(FvCompileError, match="contradicts the model's config"):
        fv_compile.compile(tiny_transformer(), fastvideo_args=FastVideoArgs(patch_size=(1, 1, 1)))


def test_sta_without_settings_says_where_they_go():
    cm = fv_compile.compile(tiny_transformer(), {"self": "SLIDING_TILE_ATTN"}, compiler="eager")
    latent, t, text = torch.randn(1, 4, 2, 4, 4), torch.tensor([500]), torch.randn(1, 3, 16)
    with (
        torch.no_grad(),
        pytest.raises(
            FvCompileError, match=r"needs windows.*fv_compile\.compile\(\.\.\., fastvideo_args="
        ),
    ):
        cm(latent, t, text)
