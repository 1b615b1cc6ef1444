"""The WGF prior-matching signal against exact enumeration (T <= 3 positions, K <= 5 codes).

The token-level rule delta_t(k) = log q(k | h_<t) - log p(k | h_<t) is an approximation of the
first variation of KL(q || p): it evaluates the contexts at the hard tokens h_<t and ignores
how changing h_t changes the contexts of later positions. On single instances it can point
the wrong way; over many instances its gradient must agree with the exact one on average.
"""
from __future__ import annotations

import statistics

import pytest
import torch

from exact import TabularAR, exact_conditionals, exact_kl, random_ar
from wartok.wgf import prior_matching_loss, shape_contrast, teacher_forced_logits, token_contrast


def signal_gradient(assign_logits: torch.Tensor, tracker: TabularAR, target: TabularAR,
                    center: bool = False, clip: float = 0.0) -> torch.Tensor:
    """d L_prior / d a for assignment logits a (N, T, K), teacher-forced on the hard tokens."""
    a = assign_logits.detach().clone().requires_grad_(True)
    hard = a.detach().argmax(-1)  # (N, T)
    delta = token_contrast(teacher_forced_logits(tracker, hard), teacher_forced_logits(target, hard)).double()
    delta = shape_contrast(delta, a.softmax(-1), center, clip)
    (grad,) = torch.autograd.grad(prior_matching_loss(a, delta), a)
    return grad


def test_autograd_gradient_equals_central_finite_difference() -> None:
    g = torch.Generator().manual_seed(0)
    N, T, K = 3, 3, 4
    a = torch.randn(N, T, K, generator=g, dtype=torch.float64)
    delta = torch.randn(N, T, K, generator=g, dtype=torch.float64)

    def objective(x: torch.Tensor) -> torch.Tensor:
        return prior_matching_loss(x, delta).double()

    x = a.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(x), x)
    eps = 1e-6
    numeric = torch.zeros_like(a)
    for i in range(a.numel()):
        step = torch.zeros(a.numel(), dtype=a.dtype)
        step[i] = eps
        step = step.view_as(a)
        numeric.view(-1)[i] = (objective(a + step) - objective(a - step)) / (2 * eps)
    torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-9)
    # and it is the closed form pi * (delta - E_pi delta) / (N * T)
    pi = a.softmax(-1)
    closed = pi * (delta - (pi * delta).sum(-1, keepdim=True)) / (N * T)
    torch.testing.assert_close(grad, closed, rtol=1e-10, atol=1e-12)


def test_signal_agrees_with_the_exact_kl_gradient_on_average(capsys: pytest.CaptureFixture) -> None:
    g = torch.Generator().manual_seed(1)
    cosines = []
    for _ in range(200):
        N, T, K = 4, int(torch.randint(2, 4, (1,), generator=g)), int(torch.randint(3, 6, (1,), generator=g))
        a = (torch.randn(N, T, K, generator=g, dtype=torch.float64) * 2.0).requires_grad_(True)
        target = random_ar(K, T, g)
        (exact,) = torch.autograd.grad(exact_kl(a, target), a)
        approx = signal_gradient(a, exact_conditionals(a), target)
        cosines.append(torch.nn.functional.cosine_similarity(exact.flatten(), approx.flatten(), dim=0).item())
    deciles = statistics.quantiles(cosines, n=10)
    with capsys.disabled():
        print(f"\ncosine(WGF signal gradient, exact dKL/da) over {len(cosines)} instances: "
              f"mean {statistics.mean(cosines):.3f}, median {statistics.median(cosines):.3f}, "
              f"deciles {[round(d, 2) for d in deciles]}, negative {sum(c < 0 for c in cosines)}")
    assert statistics.mean(cosines) > 0.3
    assert statistics.median(cosines) > 0.3


@pytest.mark.parametrize(("center", "clip"), [(False, 0.0), (True, 1.0)])
def test_tracker_equal_to_target_gives_exactly_zero_gradient(center: bool, clip: float) -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.randn(5, 3, 5, generator=g, dtype=torch.float64)
    target = random_ar(5, 3, g)
    grad = signal_gradient(a, target, target, center=center, clip=clip)
    assert torch.count_nonzero(grad) == 0


def test_centring_leaves_the_gradient_unchanged_and_clipping_bounds_delta() -> None:
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    tracker, target = random_ar(5, 3, g, sharpness=4.0), random_ar(5, 3, g, sharpness=4.0)
    torch.testing.assert_close(signal_gradient(a, tracker, target, center=True),
                               signal_gradient(a, tracker, target, center=False))
    hard = a.argmax(-1)
    delta = token_contrast(teacher_forced_logits(tracker, hard), teacher_forced_logits(target, hard))
    assert delta.abs().max() > 0.5
    assert shape_contrast(delta, a.softmax(-1).float(), True, 0.5).abs().max() <= 0.5


def test_token_contrast_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        token_contrast(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))
