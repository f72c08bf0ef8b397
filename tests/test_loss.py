"""loss.linear_cross_entropy against the textbook output layer + F.cross_entropy."""
import pytest
import torch
import torch.nn.functional as F

import loss


def textbook(h, w, y, scale):
    return F.cross_entropy((h @ w.to(h.dtype).t()).float(), y, reduction="sum") * scale


@pytest.mark.parametrize("dtype, spread", [(torch.float32, 1.0), (torch.float32, 60.0), (torch.bfloat16, 1.0)])
def test_fused_loss_and_gradients_equal_the_textbook_ones(dtype, spread, monkeypatch):
    """Over several chunks (one ragged), with logits far into exp's underflow (spread 60), and with
    the weight trained or frozen: same loss, same gradients for h and the weight."""
    monkeypatch.setattr(loss, "CHUNK", 7)
    g = torch.Generator().manual_seed(0)
    h0 = (torch.randn(30, 16, generator=g) * spread).to(dtype)
    w0 = torch.randn(50, 16, generator=g)
    y = torch.randint(0, 50, (30,), generator=g)
    results = []
    for fn in (textbook, loss.linear_cross_entropy):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        value = fn(h, w, y, 1 / 30)
        value.backward()
        results.append((value.detach(), h.grad, w.grad))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-2)
    for ref, ours in zip(*results):
        torch.testing.assert_close(ours.float(), ref.float(), **tol)


def test_a_frozen_weight_gets_no_gradient_and_a_scaled_loss_scales_its_gradient():
    h, w, y = torch.randn(5, 8, requires_grad=True), torch.randn(11, 8), torch.tensor([0, 3, 10, 2, 2])
    (2 * loss.linear_cross_entropy(h, w, y, 0.5)).backward()
    ref = h.detach().clone().requires_grad_()
    F.cross_entropy(ref @ w.t(), y, reduction="sum").backward()
    assert w.grad is None
    torch.testing.assert_close(h.grad, ref.grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_fused_loss_and_its_gradient_equal_the_textbook_ones():
    g = torch.Generator().manual_seed(0)
    h0, w = torch.randn(300, 64, generator=g).bfloat16().cuda(), torch.randn(1000, 64, generator=g).bfloat16().cuda()
    y = torch.randint(0, 1000, (300,), generator=g).cuda()
    results = []
    for fn in (textbook, loss.linear_cross_entropy):
        h = h0.clone().requires_grad_()
        value = fn(h, w, y, 1 / 300)
        value.backward()
        results.append((value.detach().float(), h.grad.float()))
    for ref, ours in zip(*results):
        torch.testing.assert_close(ours, ref, atol=2e-3, rtol=2e-2)
