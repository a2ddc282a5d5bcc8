"""An engine performance model fitted online from observed steps.

One step of a continuous-batching engine computes some uncached prompt tokens (prefill,
possibly chunked) and one token for each decoding sequence. Its time is modelled as

    ms = [T > 0] * (q*T^2 + l*T + p0)  +  [b > 0] * (d0 + cb*b + cu*u + cu2*u^2)

with T the prompt tokens computed, b the decoding sequences and u the KV use of those
sequences (their context tokens / the worker's KV capacity in tokens). The prefill part is
the shape of attention + MLP cost in the prompt length; the decode part covers both a
memory-bound engine (cost grows with the context read: u) and a compute-bound one (grows with
the batch: b). Dynamo's mocker polynomial is exactly of this form, so a mocker is fitted
exactly; a torch engine is fitted to within its step-time noise.

The fit is least squares over a bounded window of recent steps, solved as a correction to a
prior (by default the mocker polynomial): directions the samples do not determine (only
decode steps seen, one batch size only) keep the prior's coefficients instead of going wild,
and everything the samples do determine comes from the data alone. Prefill and batch coefficients are kept >= 0 so predictions never fall
as the work grows. Refitting is lazy (at most once per batch of new samples).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

_T_SCALE = 1000.0  # prompt tokens in thousands: keeps the columns of X on similar scales
_B_SCALE = 64.0
# coefficient order: q, l, p0, d0, cb, cu, cu2
_N = 7
_NONNEG = (0, 1, 4)  # q, l, cb: a longer prompt or a bigger batch never makes a step faster
# The longest step taken as one (ms). Real steps take milliseconds to seconds (a 128k-token
# prefill on one GPU: tens of seconds); step stats come from workers over the bus, and one
# report of 1e308 ms (finite, so it passed) pulled every coefficient to ~1e307: a worker
# "served 0.00 req/s" and the pool went to its ceiling.
MAX_STEP_MS = 600_000.0


@dataclass(frozen=True, slots=True)
class StepTimePrior:
    """Coefficients in natural units (ms, tokens, sequences, usage fraction)."""

    prefill_quadratic: float = 4.209989e-7
    prefill_linear: float = 0.01518344
    prefill_const: float = 16.50142
    decode_const: float = 5.74
    decode_per_seq: float = 0.0
    decode_usage: float = 54.01
    decode_usage_sq: float = -25.74

    def vector(self) -> np.ndarray:
        return np.array([
            self.prefill_quadratic * _T_SCALE ** 2, self.prefill_linear * _T_SCALE,
            self.prefill_const, self.decode_const, self.decode_per_seq * _B_SCALE,
            self.decode_usage, self.decode_usage_sq])

    def scaled(self, speedup: float) -> StepTimePrior:
        """The same shape `speedup` times faster (a mocker run with --speedup)."""
        s = max(speedup, 1e-9)
        return StepTimePrior(*(getattr(self, f) / s for f in self.__dataclass_fields__))


def _features(prefill_tokens: float, decode_seqs: float, kv_usage: float) -> list[float]:
    t = prefill_tokens / _T_SCALE
    has_p = 1.0 if prefill_tokens > 0 else 0.0
    has_d = 1.0 if decode_seqs > 0 else 0.0
    u = kv_usage * has_d
    return [t * t, t, has_p, has_d, decode_seqs / _B_SCALE, u, u * u]


class PerfModel:
    def __init__(self, prior: StepTimePrior | None = None, *, window: int = 1024,
                 rcond: float = 1e-6, min_ms: float = 0.01) -> None:
        if window < 8:
            raise ValueError(f"window must be >= 8 steps, got {window}")
        self.prior = prior or StepTimePrior()
        self._w_prior = self.prior.vector()
        self.rcond = rcond
        self.min_ms = min_ms
        self._x: deque[list[float]] = deque(maxlen=window)
        self._y: deque[float] = deque(maxlen=window)
        self._w = self._w_prior.copy()
        self._dirty = False
        self.observed = 0  # steps ever observed

    # ---- input ------------------------------------------------------------------------------
    def observe_step(self, prefill_tokens: float, decode_seqs: float, kv_usage: float,
                     ms: float) -> bool:
        """One engine step; False (ignored) for a sample that cannot be a real step."""
        vals = (prefill_tokens, decode_seqs, kv_usage, ms)
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in vals):
            return False
        if (prefill_tokens < 0 or decode_seqs < 0 or not 0 < ms <= MAX_STEP_MS
                or not 0 <= kv_usage <= 1):
            return False
        if prefill_tokens == 0 and decode_seqs == 0:
            return False  # an idle step says nothing about cost
        self._x.append(_features(prefill_tokens, decode_seqs, kv_usage))
        self._y.append(float(ms))
        self._dirty = True
        self.observed += 1
        return True

    @property
    def samples(self) -> int:
        return len(self._y)

    # ---- fit --------------------------------------------------------------------------------
    def _fit(self) -> None:
        self._dirty = False
        if not self._y:
            self._w = self._w_prior.copy()
            return
        x = np.asarray(self._x, dtype=np.float64)
        y = np.asarray(self._y, dtype=np.float64)
        free = list(range(_N))
        w = self._w_prior.copy()
        for _ in range(len(_NONNEG) + 1):  # active set: pin a negative "never falls" term at 0
            w = self._solve(x, y, free)
            bad = [i for i in _NONNEG if i in free and w[i] < 0]
            if not bad:
                break
            free = [i for i in free if i not in bad]
        self._w = w

    def _solve(self, x: np.ndarray, y: np.ndarray, free: list[int]) -> np.ndarray:
        """Least squares for the free coefficients as a correction to the prior: directions
        the samples do not determine (singular values below rcond) keep the prior's value,
        pinned coefficients are 0."""
        w = self._w_prior.copy()
        pinned = [i for i in range(_N) if i not in free]
        w[pinned] = 0.0
        resid = y - x @ w
        try:
            delta, *_ = np.linalg.lstsq(x[:, free], resid, rcond=self.rcond)
        except np.linalg.LinAlgError:
            return w
        if np.all(np.isfinite(delta)):
            w[free] += delta
        return w

    def _coef(self) -> np.ndarray:
        if self._dirty:
            self._fit()
        return self._w

    # ---- predictions ------------------------------------------------------------------------
    def step_ms(self, prefill_tokens: float, decode_seqs: float, kv_usage: float) -> float:
        f = _features(max(0.0, prefill_tokens), max(0.0, decode_seqs),
                      min(1.0, max(0.0, kv_usage)))
        ms = float(np.dot(self._coef(), f))
        return ms if math.isfinite(ms) and ms > self.min_ms else self.min_ms

    def prefill_ms(self, tokens: float) -> float:
        """Time of a step that computes `tokens` uncached prompt tokens and nothing else."""
        if tokens <= 0:
            return 0.0
        return self.step_ms(tokens, 0, 0.0)

    def decode_ms(self, batch: float, kv_usage: float) -> float:
        """Time of a decode step of `batch` sequences whose context fills `kv_usage` of KV."""
        if batch <= 0:
            return 0.0
        return self.step_ms(0, batch, kv_usage)

    def coefficients(self) -> dict[str, float]:
        w = self._coef()
        return {"prefill_quadratic": w[0] / _T_SCALE ** 2, "prefill_linear": w[1] / _T_SCALE,
                "prefill_const": w[2], "decode_const": w[3], "decode_per_seq": w[4] / _B_SCALE,
                "decode_usage": w[5], "decode_usage_sq": w[6]}
