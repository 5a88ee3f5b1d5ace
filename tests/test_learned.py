"""Learned rounding: the seed's optimizers and schedules, checked against an explicit reference loop, on every
format, through the CLI and the library."""
import math

import pytest
import torch

import quant_core
from quant_core.quantization.formats import make_format
from quant_core.io.reader import SafetensorsReader
from quant_core.quantization.methods.learned import LearnedConfig, LearnedRounding, LrSchedule, singular_subspace
from quant_core.quantization.methods.rtn import RoundToNearest


# quantize two layers of the tiny Flux file (the rest kept): enough to exercise every format, fast on 2 cores
TWO_LAYERS = r"^(?!(double_blocks\.0\.img_attn\.qkv|single_blocks\.0\.linear2)$)"


def weight(n=96, k=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05


def seed_style_original_loop(fmt, grid, config):
    """The seed's `original` optimizer written out: a matrix step per iteration (the reference for the closed form).
    In float64: 300 fp32 additions of small steps to codes near ±127 would drift by ~1e-3 on their own."""
    u, v = (t.double() for t in singular_subspace(grid.work, config))
    q = RoundToNearest().codes(fmt, grid, "x").double()
    scale, work = grid.scale.double(), grid.work.double()
    schedule = LrSchedule(config, tuple(grid.work.shape))
    best = q.clone()
    for i in range(config.num_iter):
        p = u.T @ (q * scale - work) @ v
        loss = float(torch.linalg.matrix_norm(p))
        if schedule.step(loss, i):
            best = q.clone()
        if schedule.should_stop():
            break
        q = q - schedule.lr * (u @ (p / loss) @ v.T) / scale
    return best.float()


@pytest.mark.parametrize("schedule", ["adaptive", "exponential", "plateau"])
@pytest.mark.parametrize("family", ["int8", "fp8", "nvfp4"])
def test_original_closed_form_matches_the_explicit_loop(family, schedule):
    fmt = make_format(family)
    grid = fmt.grid(weight())
    # a small LR keeps the loss decreasing (no ties between near-equal losses once it oscillates around zero)
    config = LearnedConfig(num_iter=300, lr_schedule=schedule, lr=1e-5, min_k=8, top_p=0.2, full_matrix=True)
    method = LearnedRounding(config)
    u, v = singular_subspace(grid.work, config)
    rtn = RoundToNearest().codes(fmt, grid, "x")
    closed = method._original(rtn, grid, u, v)
    explicit = seed_style_original_loop(fmt, grid, config)
    assert torch.allclose(closed, explicit, atol=1e-4, rtol=0), float((closed - explicit).abs().max())
    loss = lambda q: float(torch.linalg.matrix_norm(u.T @ (q * grid.scale - grid.work) @ v))  # noqa: E731
    assert loss(closed) < loss(rtn) - 5e-4
    # with the seed's default LR the loss reaches ~0 in a few steps: the closed form finds it too
    default = LearnedRounding(LearnedConfig(min_k=8, full_matrix=True))
    assert loss(default._original(rtn, grid, u, v)) < 1e-3 * loss(rtn)


@pytest.mark.parametrize("optimizer", ["adamw", "radam"])
def test_adaptive_moment_optimizers_reduce_the_projected_loss(optimizer):
    fmt = make_format("fp8")
    grid = fmt.grid(weight())
    config = LearnedConfig(optimizer=optimizer, num_iter=200, lr=0.05, lr_schedule="exponential", min_k=8)
    method = LearnedRounding(config)
    u, v = singular_subspace(grid.work, config)
    rtn = RoundToNearest().codes(fmt, grid, "x")
    moved = method._adaptive_moment(rtn, grid, u, v)
    loss = lambda q: float(torch.linalg.matrix_norm(u.T @ (q * grid.scale - grid.work) @ v))  # noqa: E731
    assert loss(moved) < 0.7 * loss(rtn)
    codes = method.codes(fmt, grid, "x")  # snapped back onto the FP8 grid
    assert torch.equal(codes, fmt.round(codes.clone()))


def test_schedules_follow_the_seed_rules():
    plateau = LrSchedule(LearnedConfig(lr=1.0, lr_schedule="plateau", lr_patience=2, lr_factor=0.5, lr_cooldown=1,
                                       lr_shape_influence=0.0), (10, 10))
    lrs = []
    for i, loss in enumerate([5, 6, 6, 6, 6, 6, 6]):
        plateau.step(loss, i)
        lrs.append(plateau.lr)
    assert lrs == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.125]  # decay at 2 stalled steps; cooldown 1 (still counting)
    elongated = LrSchedule(LearnedConfig(lr_schedule="plateau", lr_factor=0.9), (10, 40))
    assert math.isclose(elongated.plateau_factor, 0.9 ** 2)  # sqrt(aspect 4) = 2, full influence
    expo = LrSchedule(LearnedConfig(lr=1.0, lr_schedule="exponential", lr_gamma=0.5, lr_min=0.2), (4, 4))
    for i in range(4):
        expo.step(1.0, i)
    assert expo.lr == 0.2
    adaptive = LrSchedule(LearnedConfig(lr=1.0, early_stop_stall=100), (10, 10))
    adaptive.step(1.0, 0)  # first improvement right away: no boost (u-curve at 1)
    assert adaptive.lr == 1.0
    for i in range(1, 51):
        adaptive.step(2.0, i)
    decayed = adaptive.lr
    assert decayed < 1.0
    adaptive.step(0.5, 51)  # improvement after 50 stalled steps (the strongest point of the curve): boost 1.25
    assert math.isclose(adaptive.lr, decayed * 1.25)


def test_adaptive_modes_differ_in_the_stall_counter():
    counts = {}
    for mode in ("simple-reset", "no-reset"):
        s = LrSchedule(LearnedConfig(lr_adaptive_mode=mode), (8, 8))
        for i, loss in enumerate([3, 4, 4, 2, 4]):
            s.step(loss, i)
        counts[mode] = s.worse
    assert counts == {"simple-reset": 1, "no-reset": 3}


def test_early_stopping_and_iteration_limit():
    fmt = make_format("int8")
    grid = fmt.grid(weight())
    stop_on_loss = LearnedRounding(LearnedConfig(early_stop_loss=1e9))
    stop_on_loss.codes(fmt, grid, "x")
    assert stop_on_loss.last_iterations == 1
    # a constant LR far above the loss jumps between L0 and lr − L0: never better than the first loss, so the run
    # stops when the stall counter exceeds 3, on the 5th loss
    stall = LearnedRounding(LearnedConfig(lr_schedule="plateau", lr_patience=10 ** 6, early_stop_stall=3, lr=1e3))
    stall.codes(fmt, grid, "x")
    assert stall.last_iterations == 5
    limited = LearnedRounding(LearnedConfig(num_iter=17, early_stop_stall=10 ** 6, lr=1e-9))
    limited.codes(fmt, grid, "x")
    assert limited.last_iterations == 17


def test_rank_selection_follows_top_p_min_k_max_k():
    c = LearnedConfig(top_p=0.2, min_k=64, max_k=1024)
    assert c.rank((3072, 12288)) == 614 and c.rank((384, 384)) == 76 and c.rank((100, 50)) == 50
    assert LearnedConfig(min_k=0, max_k=16).validate().rank((3072, 3072)) == 16


@pytest.mark.parametrize("options,optimizer", [
    ({"format": "int8"}, "original"), ({"format": "int8", "convrot": True, "convrot_group_size": 16}, "radam"),
    ({"format": "fp8"}, "adamw"), ({"format": "nvfp4"}, "original"), ({"format": "mxfp8"}, "adamw"),
    ({"format": "int4"}, "adamw")],
    ids=["int8", "convrot", "fp8", "nvfp4", "mxfp8", "int4"])
def test_every_format_through_the_library_passes_full_verify(flux_file, tmp_path, options, optimizer):
    out = str(tmp_path / "learned.safetensors")
    result = quant_core.quantize(input=flux_file, output=out, method="learned", verify="full", exclude_layers=TWO_LAYERS,
                                 optimizer=optimizer, num_iter=20, **options)
    assert result.verify.ok and result.verify.checked_reference
    assert len(result.report.layers) == 2 and all(layer.sqnr_db > 15 for layer in result.report.layers)


def test_cli_learned_rounding_names_the_method(cli, flux_file, tmp_path):
    out = tmp_path / "o.safetensors"
    code, stdout, err = cli("-i", flux_file, "-o", out, "--exclude-layers", TWO_LAYERS, "--optimizer", "original",
                            "--num_iter", "50",
                            "--lr_schedule", "plateau", "--lr_patience", "3", "--top_p", "0.1", "--full_matrix")
    assert code == 0, err
    with SafetensorsReader(str(out)) as reader:
        assert '"method": "learned"' in reader.metadata()["quant_core"]
    code, stdout, err = cli("-i", flux_file, "--exclude-layers", TWO_LAYERS, "--optimizer", "radam", "--num_iter", "5",
                            "--verify", "off")
    assert code == 0 and "_learned_int8_row.safetensors" in stdout


def test_randomized_svd_is_seeded_without_touching_the_callers_rng():
    w = weight(300, 500)
    config = LearnedConfig(min_k=8)
    first = singular_subspace(w, config)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    second = singular_subspace(w, config)
    assert torch.equal(torch.rand(3), expected)  # the caller's stream continues as if nothing happened
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])  # same file from the same input
