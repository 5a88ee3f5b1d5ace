"""SVD learned rounding (`--optimizer original|adamw|radam`): on the format's fixed scale grid, optimize a
continuous perturbation of the round-to-nearest codes so that the weight error projected onto the top-k singular
subspace of the weight, ‖U_kᵀ (Q·S − W) V_k‖_F, shrinks; then snap back onto the grid with the format's rounding.

The final snap to the grid undoes most of the continuous optimization, and the projected objective is not the
layer's output error on real inputs; docs/METHODS.md has the measurements against round-to-nearest.

The `original` optimizer steps along the normalized projected error, which keeps every iterate on the line
E₀ − c·U_kU_kᵀE₀V_kV_kᵀ; its whole schedule is run on the scalar c (no matrix work per iteration) and the result
applied once: the same iterates as a loop over the matrix, without its minutes per layer. AdamW/RAdam are
element-wise, so they run the full projected gradient per iteration, vectorized, on the layer's device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...declare import option
from ...errors import QuantError
from ..formats.base import Format, Grid, divide_by_scale
from .rtn import RoundToNearest

OPTIMIZERS = ("original", "adamw", "radam")
SCHEDULES = ("adaptive", "exponential", "plateau")
ADAPTIVE_MODES = ("simple-reset", "no-reset")
THRESHOLD_MODES = ("rel", "abs")
BF16_MODES = ("auto", "on", "off")
ADAPTIVE_BOOST = 1.25  # convert-to-quant's base LR boost on an improvement
ADAPTIVE_MAX_DECAY = 0.995
MAX_LR = 100.0


def _schedule_is(*schedules: str):
    """`needs` of a setting that only one or two learning-rate schedules read."""
    def needs(settings: dict) -> str | None:
        if settings["lr_schedule"] not in schedules:
            return f"applies to --lr_schedule {' or '.join(schedules)} (the schedule is {settings['lr_schedule']})"
        return None
    return needs


def _bf16_auto(settings: dict) -> str | None:
    if settings["bf16_compute"] != "auto":
        return "applies to --bf16-compute auto"
    if settings["low_memory"] or settings["device"] == "cpu":
        return "applies to a CUDA device (--bf16-compute auto computes in fp32 on the CPU)"
    return None


@dataclass
class LearnedConfig:
    """Learned rounding (--optimizer original|adamw|radam). Units: lr in weight units per step for `original`, in
    code units for adamw/radam; thresholds on the projected loss ‖·‖_F."""

    optimizer: str = option("original", help="the optimizer (CLI: --optimizer original|adamw|radam)",
                            choices=OPTIMIZERS)
    num_iter: int = option(1000, "--num_iter", "--num-iter", help="maximum iterations per layer", low=0)
    lr: float = option(0.008077, "--lr", help="initial learning rate", low=1e-30)
    lr_schedule: str = option("adaptive", "--lr_schedule", "--lr-schedule", help="learning-rate schedule",
                              choices=SCHEDULES)
    lr_gamma: float = option(0.99, "--lr_gamma", "--lr-gamma", help="decay per step", low=1e-30,
                             needs=_schedule_is("exponential"))
    lr_patience: int = option(9, "--lr_patience", "--lr-patience", low=0,
                              help="steps without improvement before a decay", needs=_schedule_is("plateau"))
    lr_factor: float = option(0.92, "--lr_factor", "--lr-factor", help="decay factor", low=1e-30,
                              needs=_schedule_is("plateau", "adaptive"))
    lr_min: float = option(1e-10, "--lr_min", "--lr-min", help="lower bound of the learning rate",
                           needs=_schedule_is("plateau", "exponential"))
    lr_cooldown: int = option(6, "--lr_cooldown", "--lr-cooldown", low=0,
                              help="plateau: steps after a decay before watching again; adaptive: decay every N "
                                   "stalled steps", needs=_schedule_is("plateau", "adaptive"))
    lr_threshold: float = option(0.0, "--lr_threshold", "--lr-threshold", help="minimum improvement that counts")
    lr_adaptive_mode: str = option("simple-reset", "--lr_adaptive_mode", "--lr-adaptive-mode", choices=ADAPTIVE_MODES,
                                   help="simple-reset (the stall counter restarts at each improvement) or no-reset",
                                   needs=_schedule_is("adaptive"))
    lr_shape_influence: float = option(1.0, "--lr-shape-influence", "--lr_shape_influence",
                                       help="elongated weights decay faster: factor^sqrt(aspect) blended by this "
                                            "(0 = off)", needs=_schedule_is("plateau"))
    lr_threshold_mode: str = option("rel", "--lr-threshold-mode", "--lr_threshold_mode", choices=THRESHOLD_MODES,
                                    help="--lr_threshold relative to the best loss (rel) or absolute (abs)")
    early_stop_loss: float = option(1e-8, "--early-stop-loss", "--early_stop_loss",
                                    help="stop when the loss is below this")
    early_stop_lr: float = option(1e-10, "--early-stop-lr", "--early_stop_lr", help="stop when the LR is below this")
    early_stop_stall: int = option(1000, "--early-stop-stall", "--early_stop_stall", low=0,
                                   help="stop after this many steps without improvement")
    top_p: float = option(0.2, "--top_p", "--top-p", help="share of the rank used as k singular directions",
                          low=1e-30, high=1.0)
    min_k: int = option(64, "--min_k", "--min-k", help="minimum k", low=0)
    max_k: int = option(1024, "--max_k", "--max-k", help="maximum k", low=0)
    full_matrix: bool = option(False, "--full_matrix", "--full-matrix",
                               help="exact SVD instead of the randomized low-rank one")
    bf16_compute: str = option("auto", "--bf16-compute", choices=BF16_MODES,
                               help="bf16 for the projections: auto (CUDA with bf16, layers of at least "
                                    "--bf16-threshold elements), on (every layer, any device), off")
    bf16_threshold: int = option(1_000_000, "--bf16-threshold", metavar="ELEMENTS", low=0, needs=_bf16_auto,
                                 help="--bf16-compute auto: smallest layer computed in bf16")

    def validate(self) -> "LearnedConfig":
        if self.min_k > self.max_k:
            raise QuantError(f"--min_k {self.min_k} is above --max_k {self.max_k}")
        return self

    def rank(self, shape: tuple[int, int]) -> int:
        """k, the number of singular directions the loss is projected on."""
        full = min(shape)
        return max(1, min(full, self.max_k, max(self.min_k, int(math.floor(self.top_p * full)))))


class LrSchedule:
    """convert-to-quant's learning-rate schedules, early stopping and improvement test, one step per loss value."""

    def __init__(self, config: LearnedConfig, shape: tuple[int, int]):
        self.c = config
        self.lr = config.lr
        self.best = math.inf
        self.worse = 0  # steps without improvement (stall counter)
        self.plateau = 0
        self.cooldown = 0
        self.shape_ratio = abs(shape[0] - shape[1]) / max(shape)
        aspect = max(shape) / max(min(shape), 1)
        blend = config.lr_shape_influence if config.lr_schedule == "plateau" else 0.0
        self.plateau_factor = config.lr_factor + (config.lr_factor ** math.sqrt(aspect) - config.lr_factor) * blend

    def improved(self, loss: float) -> bool:
        if self.c.lr_threshold <= 0:
            return loss < self.best
        if self.c.lr_threshold_mode == "rel":
            return loss < self.best * (1.0 - self.c.lr_threshold)
        return self.best - loss > self.c.lr_threshold

    def step(self, loss: float, iteration: int) -> bool:
        """Record one loss; update the LR. Returns True if this loss is the new best."""
        better = self.improved(loss)
        stalled_for = self.worse
        if better:
            self.best = loss
            self.plateau = 0
            if self.c.lr_adaptive_mode == "simple-reset" or self.c.lr_schedule == "adaptive":
                self.worse = 0
        else:
            self.worse += 1
            self.plateau += 1
            stalled_for = self.worse
        if self.c.lr_schedule == "exponential":
            self.lr = max(self.lr * self.c.lr_gamma, self.c.lr_min)
        elif self.c.lr_schedule == "plateau":
            self._plateau_step()
        else:
            self._adaptive_step(better, stalled_for, iteration)
        return better

    def _plateau_step(self) -> None:
        if self.cooldown > 0:
            self.cooldown -= 1
        elif self.plateau >= self.c.lr_patience:
            if self.lr > self.c.lr_min:
                self.lr = max(self.lr * self.plateau_factor, self.c.lr_min)
                self.cooldown = self.c.lr_cooldown
            self.plateau = 0

    def _adaptive_step(self, better: bool, stalled_for: int, iteration: int) -> None:
        """Cosine U-curve: gentle at the start and end of a stall, strongest halfway to --early-stop-stall."""
        t = min(stalled_for / max(self.c.early_stop_stall, 1), 1.0)
        u = (1 + math.cos(2 * math.pi * t)) / 2
        if better:
            boost = 1.0 + (ADAPTIVE_BOOST - 1.0) * (1.0 + 0.5 * self.shape_ratio) * (1.0 - u)
            self.lr = min(self.lr * boost, MAX_LR)
            if self.c.lr_adaptive_mode == "no-reset":
                self.worse = stalled_for  # keeps counting across improvements
        elif iteration % max(self.c.lr_cooldown, 1) == 0:
            low = self.c.lr_factor - 0.03 * self.shape_ratio
            self.lr = max(self.lr * (low + (ADAPTIVE_MAX_DECAY - low) * u), self.c.early_stop_lr)

    def should_stop(self) -> bool:
        return (self.best <= self.c.early_stop_loss or self.lr <= self.c.early_stop_lr
                or self.worse > self.c.early_stop_stall)


def singular_subspace(work: torch.Tensor, config: LearnedConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_k [N,k], V_k [K,k]) of the weight's top-k singular directions (fp32)."""
    k = config.rank(tuple(work.shape))
    if config.full_matrix or k + 10 >= min(work.shape):
        u, _, vh = torch.linalg.svd(work, full_matrices=False)
        return u[:, :k].contiguous(), vh[:k].T.contiguous()
    # svd_lowrank is randomized: seed it (same file from the same input) without disturbing the caller's RNGs
    with torch.random.fork_rng(devices=[work.device] if work.device.type == "cuda" else []):
        torch.manual_seed(0)
        u, _, v = torch.svd_lowrank(work, q=k + 10, niter=4)
    return u[:, :k].contiguous(), v[:, :k].contiguous()


class LearnedRounding:
    """`codes(fmt, grid, layer)` for any format: RTN codes moved by the optimized perturbation, snapped to the grid."""

    name = "learned"
    needs_stats = False  # the objective is the weight error in the top singular subspace, no inputs

    def __init__(self, config: LearnedConfig | None = None):
        self.config = (config or LearnedConfig()).validate()
        self.compute_dtype = torch.float32  # of the projections; the converter sets it per layer (--bf16-compute)
        self.last_iterations = 0  # iterations run on the last layer (tests, benchmarks)

    def codes(self, fmt: Format, grid: Grid, layer: str, stats=None) -> torch.Tensor:
        rtn = RoundToNearest().codes(fmt, grid, layer)
        if self.config.num_iter == 0 or not bool(grid.work.any()):
            return rtn
        u, v = singular_subspace(grid.work, self.config)
        if self.config.optimizer == "original":
            continuous = self._original(rtn, grid, u, v)
        else:
            continuous = self._adaptive_moment(rtn, grid, u, v)
        return fmt.round(continuous)

    def _projected_error(self, codes: torch.Tensor, grid: Grid, u, v) -> torch.Tensor:
        """P = U_kᵀ (Q·S − W) V_k, [k, k]."""
        error = codes * grid.scale - grid.work
        dtype = self.compute_dtype
        return (u.T.to(dtype) @ error.to(dtype) @ v.to(dtype)).float()

    def _original(self, rtn: torch.Tensor, grid: Grid, u, v) -> torch.Tensor:
        """The step Q ← Q − lr·(U P̂ Vᵀ)/S moves the error by −lr·U P̂ Vᵀ, so P_t = c_t·P₀ with
        c ← c − lr·sign(c)/‖P₀‖. Run the schedule on c; apply the best c once."""
        p0 = self._projected_error(rtn, grid, u, v)
        loss0 = float(torch.linalg.matrix_norm(p0))
        schedule = LrSchedule(self.config, tuple(grid.work.shape))
        c, best_c = 1.0, 1.0
        for i in range(self.config.num_iter):
            self.last_iterations = i + 1
            if schedule.step(abs(c) * loss0, i):
                best_c = c
            if schedule.should_stop() or loss0 == 0:
                break
            c -= schedule.lr * math.copysign(1.0, c) / loss0
        step = (u @ (p0 * (best_c - 1.0)) @ v.T)
        return rtn + divide_by_scale(step, grid.scale)

    def _adaptive_moment(self, rtn: torch.Tensor, grid: Grid, u, v) -> torch.Tensor:
        """AdamW / RAdam on a perturbation δ of the codes, gradient ∂‖P‖/∂δ = S·(U P̂ Vᵀ), best δ kept."""
        delta = torch.zeros_like(rtn, requires_grad=True)
        optimizer_class = torch.optim.AdamW if self.config.optimizer == "adamw" else torch.optim.RAdam
        optimizer = optimizer_class([delta], lr=self.config.lr)
        schedule = LrSchedule(self.config, tuple(grid.work.shape))
        best = delta.detach().clone()
        dtype = self.compute_dtype
        u_c, v_c = u.to(dtype), v.to(dtype)
        for i in range(self.config.num_iter):
            self.last_iterations = i + 1
            with torch.no_grad():
                p = self._projected_error(rtn + delta, grid, u, v)
                loss = torch.linalg.matrix_norm(p)
                if schedule.step(float(loss), i):
                    best.copy_(delta)
                if schedule.should_stop():
                    break
                direction = (u_c @ (p / loss.clamp_min(1e-20)).to(dtype) @ v_c.T).float()
                delta.grad = direction.mul_(grid.scale)
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr
            optimizer.step()
        return rtn + best
