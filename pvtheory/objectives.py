"""Objectives phi: R^d -> R with value, gradient and smoothness constants L and L_S.

value and grad accept a batch of points (..., d). Quadratic objectives (least squares, quadratics,
separable quadratics) also expose their quadratic form, which the exact V step and the exact
P step solvers use; every convex objective can write itself in cvxpy.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor

from pvtheory.checks import as_tensor, check_shape


class Objective(ABC):
    """A smooth phi on R^d. Subclasses define value and grad; L and L_S where they are known."""

    d: int
    is_quadratic: bool = False  # quadratic() returns its form (exact V steps in closed form)

    @abstractmethod
    def value(self, x: Tensor) -> Tensor:
        """phi(x) for x of shape (..., d); returns shape (...)."""

    @abstractmethod
    def grad(self, x: Tensor) -> Tensor:
        """grad phi(x), same shape as x."""

    @property
    def L(self) -> float:
        """Smoothness constant: ||grad phi(x) - grad phi(y)|| <= L ||x - y||."""
        raise NotImplementedError(f"{type(self).__name__} has no known smoothness constant L")

    def L_subspace(self, S: Tensor) -> float:
        """Smoothness constant of phi restricted to the coordinates S (the paper's L_S <= L)."""
        return self.L

    def group_smoothness(self, g: int) -> Tensor:
        """L_G for each block of g consecutive coordinates (the per-group step of greedy scores)."""
        return torch.tensor([self.L_subspace(torch.arange(j, j + g)) for j in range(0, self.d, g)],
                            dtype=torch.float64)

    def curvature(self, coords: Optional[Tensor] = None) -> Union[float, Tensor]:
        """The curvature a linearized P step divides the gradient by on the coordinates `coords` (all if
        None): phi's smoothness constant there (L_S, or L) by default; a model with a diagonal
        preconditioner (LocalQuadraticModel) returns it per coordinate instead."""
        return self.L if coords is None else self.L_subspace(coords)

    def quadratic(self) -> Optional[tuple[Tensor, Tensor, float]]:
        """(Q, q, const) with phi(x) = 1/2 x'Qx - q'x + const (dense Q), or None if phi is not quadratic."""
        return None

    def cvxpy(self, x):  # x: a cvxpy expression of size d
        """phi as a cvxpy expression, for exact V steps of general convex phi."""
        raise NotImplementedError(f"{type(self).__name__} has no cvxpy form")

    def check_point(self, x) -> Tensor:
        """x as a float64 tensor (numpy accepted) with d coordinates in its last dimension."""
        if not isinstance(x, Tensor):
            x = torch.as_tensor(np.asarray(x, dtype=np.float64))
        if x.shape[-1] != self.d:
            raise ValueError(f"x has {x.shape[-1]} coordinates, phi expects d = {self.d}")
        return x


def _lambda_max(M: Tensor) -> float:
    return float(torch.linalg.eigvalsh(M)[-1]) if M.numel() else 0.0


class LeastSquares(Objective):
    """phi(x) = ||A x - b||^2."""

    is_quadratic = True

    def __init__(self, A, b) -> None:
        self.A = as_tensor("A", A)
        self.b = as_tensor("b", b)
        check_shape("A", self.A, (None, None))
        check_shape("b", self.b, (self.A.shape[0],))
        self.d = self.A.shape[1]
        self._L: Optional[float] = None

    def value(self, x: Tensor) -> Tensor:
        r = self.check_point(x) @ self.A.T - self.b
        return (r * r).sum(-1)

    def grad(self, x: Tensor) -> Tensor:
        return 2.0 * (self.check_point(x) @ self.A.T - self.b) @ self.A

    @property
    def L(self) -> float:
        if self._L is None:
            self._L = 2.0 * float(torch.linalg.matrix_norm(self.A, ord=2)) ** 2
        return self._L

    def L_subspace(self, S: Tensor) -> float:
        return 2.0 * float(torch.linalg.matrix_norm(self.A[:, S], ord=2)) ** 2 if S.numel() else 0.0

    def group_smoothness(self, g: int) -> Tensor:
        blocks = self.A.T.reshape(self.d // g, g, -1)
        return 2.0 * torch.linalg.eigvalsh(blocks @ blocks.transpose(1, 2))[:, -1]

    def quadratic(self) -> tuple[Tensor, Tensor, float]:
        return 2.0 * self.A.T @ self.A, 2.0 * self.A.T @ self.b, float(self.b @ self.b)

    def cvxpy(self, x):
        import cvxpy as cp

        return cp.sum_squares(self.A.numpy() @ x - self.b.numpy())


class Quadratic(Objective):
    """phi(x) = 1/2 x'Qx - b'x with Q symmetric positive semidefinite."""

    is_quadratic = True

    def __init__(self, Q, b) -> None:
        self.Q = as_tensor("Q", Q)
        self.b = as_tensor("b", b)
        check_shape("Q", self.Q, (None, None))
        self.d = self.Q.shape[0]
        check_shape("Q", self.Q, (self.d, self.d))
        check_shape("b", self.b, (self.d,))
        scale = float(self.Q.abs().max()) if self.Q.numel() else 0.0
        if not torch.allclose(self.Q, self.Q.T, atol=1e-10 * max(scale, 1.0)):
            raise ValueError("Q must be symmetric")
        self.eigenvalues = torch.linalg.eigvalsh(self.Q)
        if self.d and float(self.eigenvalues[0]) < -1e-9 * max(scale, 1.0):
            raise ValueError(f"Q must be positive semidefinite (smallest eigenvalue {float(self.eigenvalues[0]):.3g})")

    def value(self, x: Tensor) -> Tensor:
        x = self.check_point(x)
        return 0.5 * ((x @ self.Q) * x).sum(-1) - x @ self.b

    def grad(self, x: Tensor) -> Tensor:
        return self.check_point(x) @ self.Q - self.b

    @property
    def L(self) -> float:
        return float(self.eigenvalues[-1])

    def L_subspace(self, S: Tensor) -> float:
        return _lambda_max(self.Q[S][:, S])

    def group_smoothness(self, g: int) -> Tensor:
        n = self.d // g
        blocks = self.Q.reshape(n, g, n, g)[torch.arange(n), :, torch.arange(n), :]
        return torch.linalg.eigvalsh(blocks)[:, -1]

    def quadratic(self) -> tuple[Tensor, Tensor, float]:
        return self.Q, self.b, 0.0

    def cvxpy(self, x):
        import cvxpy as cp

        Qs = 0.5 * (self.Q + self.Q.T).numpy()
        return 0.5 * cp.quad_form(x, cp.psd_wrap(Qs)) - self.b.numpy() @ x


class DiagonalQuadratic(Objective):
    """A quadratic phi with a constant diagonal Hessian (`hessian_diagonal`, per coordinate): its
    smoothness constants are that diagonal's maxima over all coordinates, a subspace, a group."""

    is_quadratic = True

    @property
    @abstractmethod
    def hessian_diagonal(self) -> Tensor: ...

    @property
    def L(self) -> float:
        return float(self.hessian_diagonal.max())

    def L_subspace(self, S: Tensor) -> float:
        return float(self.hessian_diagonal[S].max()) if S.numel() else 0.0

    def group_smoothness(self, g: int) -> Tensor:
        return self.hessian_diagonal.reshape(-1, g).max(1).values


class SeparableQuadratic(DiagonalQuadratic):
    """phi(x) = 1/2 sum_i w_i (x_i - t_i)^2 with w_i > 0: weighted 1-D k-means when x is in R^d_c."""

    def __init__(self, w, t) -> None:
        self.w = as_tensor("w", w)
        self.t = as_tensor("t", t)
        check_shape("w", self.w, (None,))
        check_shape("t", self.t, (self.w.shape[0],))
        if self.w.numel() and float(self.w.min()) <= 0:
            raise ValueError("separable quadratic weights w must be positive")
        self.d = self.w.shape[0]

    def value(self, x: Tensor) -> Tensor:
        r = self.check_point(x) - self.t
        return 0.5 * (self.w * r * r).sum(-1)

    def grad(self, x: Tensor) -> Tensor:
        return self.w * (self.check_point(x) - self.t)

    @property
    def hessian_diagonal(self) -> Tensor:
        return self.w

    def separable_form(self) -> tuple[Tensor, Tensor]:
        """(w, t): phi = 1/2 sum w (x - t)^2, without forming a d x d matrix."""
        return self.w, self.t

    def quadratic(self) -> tuple[Tensor, Tensor, float]:
        return torch.diag(self.w), self.w * self.t, 0.5 * float((self.w * self.t * self.t).sum())

    def cvxpy(self, x):
        import cvxpy as cp

        return 0.5 * cp.sum(cp.multiply(self.w.numpy(), cp.square(x - self.t.numpy())))


class Logistic(Objective):
    """phi(x) = sum_i log(1 + exp(-y_i a_i'x)) + reg/2 ||x||^2, labels y in {-1, +1}."""

    def __init__(self, A, y, reg: float = 0.0) -> None:
        self.A = as_tensor("A", A)
        self.y = as_tensor("y", y)
        check_shape("A", self.A, (None, None))
        check_shape("y", self.y, (self.A.shape[0],))
        if not bool(((self.y == 1) | (self.y == -1)).all()):
            raise ValueError("logistic labels y must be -1 or +1")
        if not np.isfinite(reg) or reg < 0:
            raise ValueError(f"reg must be finite and >= 0, got {reg}")
        self.reg = float(reg)
        self.d = self.A.shape[1]

    def value(self, x: Tensor) -> Tensor:
        x = self.check_point(x)
        margins = (x @ self.A.T) * self.y
        return torch.nn.functional.softplus(-margins).sum(-1) + 0.5 * self.reg * (x * x).sum(-1)

    def grad(self, x: Tensor) -> Tensor:
        x = self.check_point(x)
        margins = (x @ self.A.T) * self.y
        return (-self.y * torch.sigmoid(-margins)) @ self.A + self.reg * x

    @property
    def L(self) -> float:
        return 0.25 * float(torch.linalg.matrix_norm(self.A, ord=2)) ** 2 + self.reg

    def L_subspace(self, S: Tensor) -> float:
        if not S.numel():
            return 0.0
        return 0.25 * float(torch.linalg.matrix_norm(self.A[:, S], ord=2)) ** 2 + self.reg

    def cvxpy(self, x):
        import cvxpy as cp

        margins = cp.multiply(self.y.numpy(), self.A.numpy() @ x)
        return cp.sum(cp.logistic(-margins)) + 0.5 * self.reg * cp.sum_squares(x)


class Autograd(Objective):
    """Any differentiable torch function phi(x) (x of shape (..., d)); gradient by autograd."""

    def __init__(self, fn: Callable[[Tensor], Tensor], d: int, L: Optional[float] = None) -> None:
        self.fn = fn
        self.d = int(d)
        self._L = L

    def value(self, x: Tensor) -> Tensor:
        return self.fn(self.check_point(x))

    def grad(self, x: Tensor) -> Tensor:
        with torch.enable_grad():
            x = self.check_point(x).detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.fn(x).sum(), x)
        return g

    @property
    def L(self) -> float:
        if self._L is None:
            raise NotImplementedError("this Autograd objective was built without L")
        return self._L


class ObservedGradient(Objective):
    """phi known only through its gradient at the current point, as at LLM scale, where dL/dW of a layer
    comes from a backward pass over a batch: grad returns that gradient; value and L are unknown,
    so a P step that needs them (the exact P step) fails with a clear error here. Wrap it in a
    preconditioner (pvtheory.preconditioners) to give linearized steps a curvature."""

    def __init__(self, grad: Tensor) -> None:
        self.g = grad.reshape(-1)
        self.d = self.g.numel()

    def value(self, x: Tensor) -> Tensor:
        raise NotImplementedError("phi's value is not observed here, only its gradient at one point: "
                                  "use a P step that needs only gradients (linearized, subspace, STE, stochastic)")

    def grad(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.d:
            raise ValueError(f"x has {x.shape[-1]} coordinates, phi expects d = {self.d}")
        return self.g


class LocalQuadraticModel(DiagonalQuadratic):
    """The model of phi around x0 that a preconditioned P step minimizes over the codes:

        m(x) = <g, x - x0> + 1/2 sum_i D_i (x_i - x0_i)^2,   D > 0 a diagonal curvature,

    e.g. g = Adam's first moment of dL/dW and D = (sqrt(v_hat) + eps) / p_lr. Its gradient at x0 is g,
    its curvature per coordinate is D (so a linearized step targets x0 - g / D, Adam's update), and
    it is separable: its exact P step is the D-weighted nearest codes to x0 - g / D."""

    def __init__(self, x0: Tensor, g: Tensor, D: Tensor) -> None:
        if not (x0.shape == g.shape == D.shape):
            raise ValueError(f"x0, g and D must have one shape, got {tuple(x0.shape)}, {tuple(g.shape)}, {tuple(D.shape)}")
        self.x0, self.g, self.D = (t if t.dim() == 1 else t.reshape(-1) for t in (x0, g, D))
        self.d = self.x0.numel()

    def value(self, x: Tensor) -> Tensor:
        r = x - self.x0
        return (self.g * r).sum(-1) + 0.5 * (self.D * r * r).sum(-1)

    def grad(self, x: Tensor) -> Tensor:
        if x is self.x0:  # the steps ask at x0 (pvtheory.steps.point keeps it): the gradient exactly
            return self.g
        return self.g + self.D * (x - self.x0)

    @property
    def hessian_diagonal(self) -> Tensor:
        return self.D

    def curvature(self, coords: Optional[Tensor] = None) -> Tensor:
        return self.D if coords is None else self.D[coords]

    def separable_form(self) -> tuple[Tensor, Tensor]:
        """(D, t): m = 1/2 sum D (x - t)^2 + const with t = x0 - g / D."""
        return self.D, self.x0 - self.g / self.D
