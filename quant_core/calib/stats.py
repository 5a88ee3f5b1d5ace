"""Per-layer input statistics (docs/CALIBRATION.md) and their streaming accumulation.

A Linear layer y = x·Wᵀ + b sees inputs x ∈ R^K. What the methods need of those inputs:
the second moment H = E[x xᵀ] (GPTQ/QuIP Hessian, up to a factor 2), its diagonal E[x_k²] when H is too large to
keep, the mean E[x] (bias correction) and max |x_k| (activation scales). Optionally a second H over held-out tokens,
so the report can say how a method does on inputs it did not see. And a small uniform sample of the input rows
themselves (`input_sample`), for what second moments cannot tell: the error of quantizing the activations at run time
(quant_core/quantization/runtime.py).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

MAX_HESSIAN_K = 16384  # above this many input features only the diagonal is kept (a [K,K] fp32 H is 1 GiB at 16384)
SAMPLE_ROWS = 256  # input rows kept per layer (a uniform sample of all rows seen): runtime.py's activation error
MAX_SAMPLE_ROWS = 4096  # the most rows a calibration file's input_sample may hold
SAMPLE_DTYPE = torch.bfloat16  # ComfyUI's compute dtype: what its kernels quantize; fp16 would overflow on Flux


@dataclass
class InputStats:
    """Statistics of one layer's inputs. Units: the layer's input units; n_tokens counts rows of x."""

    absmax: torch.Tensor  # [K]
    mean_sq: torch.Tensor  # [K]  E[x_k²]
    n_tokens: int
    hessian: torch.Tensor | None = None  # [K, K]  E[x xᵀ]
    mean: torch.Tensor | None = None  # [K]  E[x]
    heldout_hessian: torch.Tensor | None = None  # [K, K]  E[x xᵀ] over held-out tokens
    heldout_mean: torch.Tensor | None = None  # [K]
    input_scale: torch.Tensor | None = None  # [] static activation scale, if the producer wrote one
    heldout_mean_sq: torch.Tensor | None = None  # [K]  E[x_k²] over held-out tokens
    heldout_n_tokens: int | None = None  # rows of the held-out part (None: not recorded)
    input_sample: torch.Tensor | None = None  # [S, K] bf16, a uniform sample of the rows (S ≤ MAX_SAMPLE_ROWS)
    heldout_input_sample: torch.Tensor | None = None  # [S, K] bf16, the same over the held-out rows
    output_gain: torch.Tensor | None = None  # [N] per output channel: mean over tokens of (∂⟨v, Y⟩/∂y_n)², v ~ N(0, I)
    #                                          over the model output Y (calib.record.record_output_gains)

    @property
    def k(self) -> int:
        return self.absmax.shape[0]

    def second_moment(self) -> torch.Tensor:
        """H = E[x xᵀ], or its diagonal as a matrix when no full H was kept."""
        return self.hessian if self.hessian is not None else torch.diag(self.mean_sq)

    @property
    def has_heldout(self) -> bool:
        """Whether statistics of held-out inputs (rows the methods never see) are attached."""
        return any(v is not None for v in (self.heldout_hessian, self.heldout_mean_sq, self.heldout_mean))

    def heldout_second_moment(self) -> torch.Tensor | None:
        """E[x xᵀ] over the held-out rows (its diagonal as a matrix when only that was kept), or None."""
        if self.heldout_hessian is not None:
            return self.heldout_hessian
        return torch.diag(self.heldout_mean_sq) if self.heldout_mean_sq is not None else None

    def fit_part(self) -> "InputStats":
        """The fitting statistics alone."""
        return InputStats(self.absmax, self.mean_sq, self.n_tokens, self.hessian, self.mean,
                          input_scale=self.input_scale, input_sample=self.input_sample)

    def heldout_part(self) -> "InputStats | None":
        """The held-out statistics as fitting statistics of their own (absmax is not kept for them), or None."""
        if not self.has_heldout:
            return None
        mean_sq = self.heldout_mean_sq
        if mean_sq is None:
            mean_sq = torch.diagonal(self.heldout_hessian).clone()
        return InputStats(torch.zeros_like(mean_sq), mean_sq, self.heldout_n_tokens or 0, self.heldout_hessian,
                          self.heldout_mean, input_sample=self.heldout_input_sample)


class StatsAccumulator:
    """Streaming sums over batches of inputs [T, K]: memory is O(K²) (or O(K) without a Hessian) plus a buffer of
    FLUSH_TOKENS inputs, independent of the number of tokens. Inputs are buffered so that the Gram update is one
    large fp32 matmul per FLUSH_TOKENS tokens (small batches, like one sentence, would each pay a [K,K] pass);
    the running sums are float64 (the [K,K] one only up to K = 4096, fp32 above, to bound memory)."""

    FLUSH_TOKENS = 4096

    def __init__(self, k: int, hessian: bool = True, device=None, gram_dtype: torch.dtype | None = None,
                 buffered: bool = True, max_gram_tokens: int = 0, sample_rows: int = 0, seed: int = 0):
        self.k = k
        self.n = 0
        self.n_gram = 0
        self.absmax = torch.zeros(k, dtype=torch.float32, device=device)
        self.sum = torch.zeros(k, dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros(k, dtype=torch.float64, device=device)
        gram_dtype = gram_dtype or (torch.float64 if k <= 4096 else torch.float32)
        self.gram = torch.zeros(k, k, dtype=gram_dtype, device=device) if hessian and k <= MAX_HESSIAN_K else None
        self.buffered = buffered
        self.max_gram_tokens = max_gram_tokens  # > 0: the Gram sum takes an evenly strided subset of each batch
        self._buffer: list[torch.Tensor] = []
        self._buffered = 0
        self.sample = None  # the reservoir: [S, K] rows with the S smallest random keys drawn so far (bottom-k)
        if sample_rows:
            self.sample = torch.zeros(sample_rows, k, dtype=SAMPLE_DTYPE, device=device)
            self.sample_keys = torch.full((sample_rows,), 2.0, device=device)  # 2 > any key: an empty slot
            self._generator = torch.Generator(device=self.sum.device).manual_seed(seed)

    @staticmethod
    def nbytes(k: int, hessian: bool, gram_dtype: torch.dtype = torch.float32, sample_rows: int = 0) -> int:
        """Device memory of an unbuffered accumulator for K input features (with a reservoir of `sample_rows`)."""
        vectors = k * (4 + 8 + 8) + sample_rows * (k * torch.finfo(SAMPLE_DTYPE).bits // 8 + 4)
        return vectors + (k * k * torch.finfo(gram_dtype).bits // 8 if hessian else 0)

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs (any leading shape, last dimension K). Unbuffered, the batch is read in chunks of
        CHUNK_BYTES (fp32): the temporaries stay a few tens of MB whatever the batch size."""
        x = x.detach().reshape(-1, self.k)
        if not x.shape[0]:
            return
        if not self.buffered:
            self._accumulate(x.to(self.sum.device))
            return
        self._buffer.append(x.to(device=self.sum.device, dtype=torch.float32, copy=True))
        self._buffered += x.shape[0]
        if self._buffered >= self.FLUSH_TOKENS:
            self._flush()

    CHUNK_BYTES = 32 << 20

    def _flush(self) -> None:
        if not self._buffer:
            return
        x = torch.cat(self._buffer)
        self._buffer, self._buffered = [], 0
        self._accumulate(x)

    def _accumulate(self, x: torch.Tensor) -> None:
        """Fold rows [T, K] (any float dtype, on the accumulator's device; read, never modified) into the sums."""
        rows = max(1, self.CHUNK_BYTES // (4 * self.k))
        for start in range(0, x.shape[0], rows):
            chunk = x[start:start + rows].float()
            self.absmax = torch.maximum(self.absmax, chunk.abs().amax(dim=0))
            self.sum += chunk.sum(dim=0, dtype=torch.float64)
            self.sum_sq += (chunk * chunk).sum(dim=0, dtype=torch.float64)
        if self.gram is not None:
            g = x
            if self.max_gram_tokens and x.shape[0] > self.max_gram_tokens:
                stride = -(-x.shape[0] // self.max_gram_tokens)
                g = x[stride // 2::stride]  # evenly spread rows: an unbiased estimate of the same E[x xᵀ]
            for start in range(0, g.shape[0], rows):
                chunk = g[start:start + rows].float()
                if self.gram.dtype == torch.float32:
                    self.gram.addmm_(chunk.T, chunk)  # in place: no second [K,K] buffer
                else:
                    self.gram += (chunk.T @ chunk).to(self.gram.dtype)
            self.n_gram += g.shape[0]
        if self.sample is not None:
            self._sample(x)
        self.n += x.shape[0]

    def _sample(self, x: torch.Tensor) -> None:
        """Reservoir by random keys: every row gets a uniform key, the S rows with the smallest keys are kept — a
        uniform sample of all rows so far, whatever the batch sizes. Device operations only (no host sync); the
        transient memory is 2·S rows."""
        keys = torch.rand(x.shape[0], generator=self._generator, device=x.device)
        take = min(x.shape[0], self.sample.shape[0])
        keys, rows = torch.topk(keys, take, largest=False)
        all_keys = torch.cat([self.sample_keys, keys])
        all_rows = torch.cat([self.sample, x.index_select(0, rows).to(SAMPLE_DTYPE)])
        self.sample_keys, kept = torch.topk(all_keys, self.sample.shape[0], largest=False)
        self.sample = all_rows.index_select(0, kept)

    def result(self) -> InputStats:
        self._flush()
        n = max(self.n, 1)
        hessian = None if self.gram is None else (self.gram / max(self.n_gram, 1)).float().cpu()
        sample = None if self.sample is None or not self.n else self.sample[:min(self.n, self.sample.shape[0])].cpu()
        return InputStats(self.absmax.cpu(), (self.sum_sq / n).float().cpu(), self.n, hessian,
                          (self.sum / n).float().cpu(), input_sample=sample)


def layer_seed(seed: int, layer: str, heldout: bool = False) -> int:
    """A reservoir's seed: the run's seed mixed with the layer name (each layer draws its own rows)."""
    return (seed * 1_000_003 + zlib.crc32(f"{layer}{'/heldout' if heldout else ''}".encode())) % (1 << 62)


def merge_samples(a: torch.Tensor | None, n_a: int, b: torch.Tensor | None, n_b: int,
                  rows: int = SAMPLE_ROWS) -> torch.Tensor | None:
    """A uniform sample of min(rows, |a| + |b|) rows of the union of two row sets, given a uniform sample of each
    (`a` of n_a rows, `b` of n_b): how many come from each side is drawn as without replacement from n_a + n_b rows
    (hypergeometric), then that many rows of each sample. None when either side has rows but no sample (the merged
    sample must describe all rows). Seeded by the counts: the same merge gives the same rows."""
    if not n_b:
        return a
    if not n_a:
        return b
    if a is None or b is None:
        return None
    total = min(rows, a.shape[0] + b.shape[0])
    g = torch.Generator().manual_seed(n_a * 1_000_003 + n_b)
    from_a, left_a, left = 0, n_a, n_a + n_b
    for u in torch.rand(total, generator=g, dtype=torch.float64).tolist():
        if u * left < left_a:
            from_a, left_a = from_a + 1, left_a - 1
        left -= 1
    from_a = max(min(from_a, a.shape[0]), total - b.shape[0])
    pick_a = torch.randperm(a.shape[0], generator=g)[:from_a]
    pick_b = torch.randperm(b.shape[0], generator=g)[:total - from_a]
    return torch.cat([a[pick_a], b[pick_b]])


def merge_heldout(fit: InputStats, heldout: InputStats | None) -> InputStats:
    """`fit` with the held-out tokens' statistics attached: the full second moment only where one was kept (a
    diagonal-only layer gets its held-out diagonal, never a dense [K,K] matrix), the diagonal, mean and row count."""
    if heldout is None or not heldout.n_tokens:
        return fit
    fit.heldout_hessian = heldout.hessian
    fit.heldout_mean_sq = heldout.mean_sq
    fit.heldout_mean = heldout.mean
    fit.heldout_n_tokens = heldout.n_tokens
    fit.heldout_input_sample = heldout.input_sample
    return fit


def combine(a: InputStats | None, b: InputStats | None) -> InputStats | None:
    """The statistics of the union of two sets of rows (each weighted by its row count). A Hessian (and an input
    sample) survives only where both sides have one (the merged one must describe all rows); absmax is the larger of
    the two."""
    if a is None or not a.n_tokens:
        return b
    if b is None or not b.n_tokens:
        return a
    n = a.n_tokens + b.n_tokens
    wa, wb = a.n_tokens / n, b.n_tokens / n

    def mix(x, y):
        return None if x is None or y is None else x.float() * wa + y.float() * wb
    return InputStats(torch.maximum(a.absmax.float(), b.absmax.float()), mix(a.mean_sq, b.mean_sq), n,
                      mix(a.hessian, b.hessian), mix(a.mean, b.mean),
                      input_sample=merge_samples(a.input_sample, a.n_tokens, b.input_sample, b.n_tokens))
