"""SVD learned rounding (the seed's `--optimizer original|adamw|radam`): on the format's fixed scale grid, optimize a
continuous perturbation of the round-to-nearest codes so that the weight error projected onto the top-k singular
subspace of the weight, ‖U_kᵀ (Q·S − W) V_k‖_F, shrinks; then snap back onto the grid with the format's rounding.

Honest note (measured in benchmarks/bench_learned.py): the final snap to the grid undoes most of the continuous
optimization, and the projected objective is not the layer's output error on real inputs. Learned rounding therefore
does not beat round-to-nearest on output error for any format measured; RTN stays the default.

Speed: the seed's `original` optimizer steps along the normalized projected error, which keeps every iterate on the
line E₀ − c·U_kU_kᵀE₀V_kV_kᵀ; its whole schedule is run on the scalar c (no matrix work per iteration) and the
result applied once — the same iterates as the seed's loop, without its minutes per layer. AdamW/RAdam are
element-wise, so they run the full projected gradient per iteration, vectorized, on the layer's device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import QuantError
from ..formats.base import Format, Grid, divide_by_scale
from .rtn import RoundToNearest

OPTIMIZERS = ("original", "adamw", "radam")
SCHEDULES = ("adaptive", "exponential", "plateau")
ADAPTIVE_MODES = ("simple-reset", "no-reset")
THRESHOLD_MODES = ("rel", "abs")
# Said in --help, in every run's output and in the JSON report (numbers: README, benchmarks/bench_learned.py).
VERDICT = ("learned rounding does not beat round-to-nearest on output error for any format measured "
           "(all-MiniLM-L6-v2, held-out sentences: ties at best, up to 0.64 dB worse); RTN is the default")
ADAPTIVE_BOOST = 1.25  # the seed's base LR boost on an improvement
ADAPTIVE_MAX_DECAY = 0.995
MAX_LR = 100.0


@dataclass
class LearnedConfig:
    """Learned rounding settings; names and defaults are the seed manual's (units: lr in weight units per step for
    `original`, in code units for adamw/radam; thresholds on the projected loss ‖·‖_F)."""

    optimizer: str = "original"
    num_iter: int = 1000
    lr: float = 0.008077
    lr_schedule: str = "adaptive"
    lr_gamma: float = 0.99  # exponential: decay per step
    lr_patience: int = 9  # plateau: steps without improvement before a decay
    lr_factor: float = 0.92  # plateau/adaptive: decay factor
    lr_min: float = 1e-10  # plateau/exponential: lower bound
    lr_cooldown: int = 6  # plateau: steps after a decay; adaptive: decay every this many steps
    lr_threshold: float = 0.0  # minimum improvement that counts
    lr_adaptive_mode: str = "simple-reset"
    lr_shape_influence: float = 1.0  # plateau: elongated weights decay faster (0 = off)
    lr_threshold_mode: str = "rel"
    early_stop_loss: float = 1e-8
    early_stop_lr: float = 1e-10
    early_stop_stall: int = 1000
    top_p: float = 0.2  # share of the rank used as k
    min_k: int = 64
    max_k: int = 1024
    full_matrix: bool = False  # full SVD instead of the randomized low-rank one

    def validate(self) -> "LearnedConfig":
        for name, allowed in (("optimizer", OPTIMIZERS), ("lr_schedule", SCHEDULES),
                              ("lr_adaptive_mode", ADAPTIVE_MODES), ("lr_threshold_mode", THRESHOLD_MODES)):
            if getattr(self, name) not in allowed:
                raise QuantError(f"--{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        for name in ("num_iter", "lr_patience", "lr_cooldown", "early_stop_stall", "min_k", "max_k"):
            if getattr(self, name) < 0:
                raise QuantError(f"--{name} must be 0 or more, got {getattr(self, name)}")
        for name in ("lr", "lr_gamma", "lr_factor", "top_p"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise QuantError(f"--{name} must be a positive number, got {value}")
        if self.top_p > 1:
            raise QuantError(f"--top_p is a share of the rank (0 < p <= 1), got {self.top_p}")
        if self.min_k > self.max_k:
            raise QuantError(f"--min_k {self.min_k} is above --max_k {self.max_k}")
        return self

    def rank(self, shape: tuple[int, int]) -> int:
        """k, the number of singular directions the loss is projected on."""
        full = min(shape)
        return max(1, min(full, self.max_k, max(self.min_k, int(math.floor(self.top_p * full)))))


class LrSchedule:
    """The seed's learning-rate schedules, early stopping and improvement test, one step per loss value."""

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
    needs_stats = False  # the seed's objective is the weight error in the top singular subspace, no inputs

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
        """The seed's step Q ← Q − lr·(U P̂ Vᵀ)/S moves the error by −lr·U P̂ Vᵀ, so P_t = c_t·P₀ with
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
