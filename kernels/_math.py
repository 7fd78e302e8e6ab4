"""exp and log built from IEEE-exact steps (+, -, *, /, round, frexp, bit shifts).

torch.exp/log on CPU use a SIMD polynomial for most elements and libm for the tail of a
loop, so an element's bits can depend on where it sits in the tensor (hence on the batch
size). These versions run the same correctly-rounded steps for every element.
"""

import math

import torch
from torch import Tensor

_LOG2E = 1.4426950408889634
# ln 2 split so that n * _LN2_HI is exact for |n| <= 2**8 (_LN2_HI has 9 significant bits).
_LN2_HI = 0.693359375
_LN2_LO = math.log(2.0) - 0.693359375
_EXP_MIN = -87.0  # below: 0 (exp(-87) ~ 1.6e-38, the edge of normal fp32)
_EXP_MAX = 88.0  # above: inf
_SQRT_HALF = math.sqrt(0.5)


def det_exp(x: Tensor) -> Tensor:
    """exp of an fp32 tensor, within ~2 ulp; exactly 1 at 0, 0 below -87, inf above 88."""
    if x.dtype != torch.float32:
        raise ValueError(f"det_exp takes float32, got {x.dtype}")
    xc = x.clamp(_EXP_MIN, _EXP_MAX)
    n = torch.round(xc * _LOG2E)  # [-126, 127]
    r = (xc - n * _LN2_HI) - n * _LN2_LO  # |r| <= ~0.35
    # Taylor to r^7: truncation < 1e-8 relative on |r| <= 0.35.
    q = r * (1.0 / 5040.0) + (1.0 / 720.0)
    for c in (1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5):
        q = q * r + c
    y = (q * r) * r + r + 1.0
    # 2**n built from its bits (exact), NaN mapped to 0 so the int cast is defined.
    bits = (torch.nan_to_num(n).to(torch.int32) + 127) << 23
    y = y * bits.view(torch.float32)
    y = torch.where(x < _EXP_MIN, torch.zeros_like(y), y)
    return torch.where(x > _EXP_MAX, torch.full_like(y, math.inf), y)


def det_log(x: Tensor) -> Tensor:
    """log of a positive tensor, computed in float64 (~1e-16 relative), returned in x's dtype."""
    x64 = x.double()
    mant, expo = torch.frexp(x64)  # x = mant * 2**expo, mant in [0.5, 1)
    low = mant < _SQRT_HALF
    mant = torch.where(low, mant * 2.0, mant)  # now in [sqrt(.5), sqrt(2))
    expo = torch.where(low, expo - 1, expo).double()
    f = mant - 1.0
    z = f / (f + 2.0)  # log(1+f) = 2 atanh(z), |z| <= 0.172
    z2 = z * z
    s = z2 * (1.0 / 23.0) + (1.0 / 21.0)
    for k in range(19, 0, -2):
        s = s * z2 + (1.0 / k)
    y = expo * math.log(2.0) + 2.0 * (z * s)
    y = torch.where(x64 == math.inf, x64, y)
    return y.to(x.dtype)
