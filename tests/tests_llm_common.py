"""A random linear layer with correlated inputs (calibration tests)."""
import torch


def layer_problem(seed: int, out: int = 24, inp: int = 32, n: int = 400):
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(inp, out, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out, inp, generator=gen))
    X = torch.randn(n, inp, generator=gen) @ (torch.randn(inp, inp, generator=gen) * 0.3) + torch.randn(n, inp, generator=gen)
    return linear, X.T @ X / n
