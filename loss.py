"""The output layer and the cross-entropy as one operation, a chunk of positions at a time.

Written out, training's loss materialises the logits of every loss position: (N, vocab) in
bf16, then a float32 copy, log-softmax, its saved output, and in backward a zero-filled gradient
of the same size, the log-softmax gradient and a bf16 copy: six passes over N x 49,152 values on
SmolLM2, for a loss that needs one row at a time. Here each chunk's logits are computed, turned
into their loss and their gradient (softmax minus the one-hot target, Bishop 2006 eq. 4.109) in
one float32 buffer, and multiplied back at once, so nothing of size (N, vocab) outlives a chunk.
The numbers are the textbook ones in the same dtypes (logits in the matmul's dtype, softmax in
float32, the gradient rounded to the matmul's dtype before it meets the weights), which
tests/test_train.py checks against the plain step.
"""
import torch

# exp of a float32 below -87.3 is a denormal or 0; CPU exp kernels take a far slower path there,
# and most of a 49k-word softmax lies there. Clamped, each such term is 1.6e-38 instead, which
# changes neither the sum (>= 1) nor any gradient anyone could measure.
UNDERFLOW = -87.0
CHUNK = 128  # positions per chunk: a 128 x 49,152 float32 buffer is 25 MB, cache-sized on a server CPU


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i scale * CE(h_i @ W^T, y_i); the gradients are computed in forward, where the softmax is
    at hand, and scaled by backward's incoming gradient (1 when this is the loss)."""

    @staticmethod
    def forward(ctx, h, weight, targets, scale):
        w = weight.to(h.dtype)
        grad_h, grad_w = torch.empty_like(h), torch.zeros_like(w) if weight.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, h.shape[0], CHUNK):
            hc, yc = h[i:i + CHUNK], targets[i:i + CHUNK]
            z = (hc @ w.t()).float()  # logits, rounded as the plain output layer rounds them
            z_y, top = z.gather(1, yc[:, None]).squeeze(1), z.amax(-1)
            g = z.sub_(top[:, None]).clamp_min_(UNDERFLOW).exp_()  # exp(z - max), in the logits' buffer
            total_exp = g.sum(-1)
            total += (top + total_exp.log() - z_y).sum()  # log-sum-exp minus the target's logit
            g.div_(total_exp[:, None])  # softmax
            g[torch.arange(len(yc), device=g.device), yc] -= 1.0
            g = g.mul_(scale).to(h.dtype)
            grad_h[i:i + CHUNK] = g @ w
            if grad_w is not None:
                grad_w.addmm_(g.t(), hc)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        grad_w = None if grad_w is None else (grad_w * grad_out).to(ctx.w_dtype)
        return grad_h * grad_out.to(grad_h.dtype), grad_w, None, None


def linear_cross_entropy(h, weight, targets, scale=1.0):
    """scale * the summed cross-entropy of the logits h @ weight^T against targets; h (N, dim)."""
    with torch.autocast(h.device.type, enabled=False):  # dtypes are chosen inside, as autocast would
        return LinearCrossEntropy.apply(h, weight, targets, scale)
