"""What tests/test_distributed.py runs on every rank under ``torchrun --nproc_per_node 2``.

Each rank computes the iterative engine's results twice: first as a single process (before
``torch.distributed`` is initialised), then split across the ranks (gloo); both go to
``<out>/rank<r>.pt`` for the test to compare. Usage: ``torchrun ... distributed_script.py OUT``.
"""

from __future__ import annotations

import sys
import warnings

import torch
import torch.distributed as dist

import gpderiv.inference.iterative as iterative
from gpderiv import DerivativeGP

DTYPE = torch.float64
#: name: (points, dimensions, rows per block-Jacobi block or None for the default). With the default
#: 4096 rows all 61 points form one cluster (rank 1 factorises none); 40 rows make 7 clusters of 8 or
#: 9 points (3 and 4 per rank); d = 64 uses the Kronecker preconditioner (65 kinds: 32 and 33 per rank).
CASES = {"one_block": (61, 3, None), "blocks": (61, 3, 40), "kronecker": (10, 64, None)}


def model_for(n: int, d: int) -> DerivativeGP:
    """A small iterative model with distinct lengthscales and noise (uneven shares: n is odd)."""
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(n, d, dtype=DTYPE, generator=gen)
    y, grad = torch.sin(3 * X).sum(-1), 3 * torch.cos(3 * X)
    model = DerivativeGP(X, y, grad, noise=0.05, grad_noise=0.5, inference="iterative")
    model.covar_module.base_kernel.lengthscale = torch.linspace(0.3, 0.6, d, dtype=DTYPE) * (1 if d < 10 else d**0.5)
    return model


def results(n: int, d: int, block_rows: int | None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Loss and gradient, predictions, the gradient of predicted means in the test inputs, a short fit.

    ``seed`` seeds the loss's probe vectors (rank 0's are used on every rank).
    """
    iterative.PRECONDITIONER_BLOCK_ROWS = block_rows or 4096
    out: dict[str, torch.Tensor] = {}
    model = model_for(n, d)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(seed)
    loss = model.loss()
    out["loss"] = loss.detach()
    out["loss_grad"] = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
    Xs = torch.rand(7, d, dtype=DTYPE, generator=torch.Generator().manual_seed(1))  # 3 and 4 test points per rank
    pred = model.predict(Xs)
    for name in ("mean", "grad_mean", "variance", "grad_variance"):
        out[name] = getattr(pred, name)
    Xs_grad = Xs.clone().requires_grad_(True)
    fast = model.predict(Xs_grad, variance=False)  # matrix-free means, test points split across ranks
    out["fast_mean"] = torch.cat([fast.mean.detach(), fast.grad_mean.detach().reshape(-1)])
    (out["mean_input_grad"],) = torch.autograd.grad(fast.mean.sum() + fast.grad_mean.sum(), Xs_grad)
    model.fit(maxiter=3, seed=0, progress=False)
    out["fitted"] = torch.cat([p.detach().reshape(-1) for p in params])
    out["fitted_mean"] = model.predict(Xs, variance=False).mean
    iterative.PRECONDITIONER_BLOCK_ROWS = 4096
    return out


def variational(fit: bool) -> dict[str, torch.Tensor]:
    """The variational engine: full-batch loss and gradient, the streaming factor's ELBO, predictions
    (``fit=False``: deterministic, split or not); or a short minibatch fit (``fit=True``: the ranks
    share out each minibatch, so only their agreement is checked)."""
    gen = torch.Generator().manual_seed(2)
    X = torch.rand(41, 2, dtype=DTYPE, generator=gen)
    y, grad = torch.sin(3 * X).sum(-1), 3 * torch.cos(3 * X)
    options = {"num_inducing": 9, "directions": 1, "batch_size": 6 if fit else None}
    model = DerivativeGP(X, y, grad, noise=0.01, inference="variational", inference_options=options)
    out: dict[str, torch.Tensor] = {}
    params = [p for p in model.parameters() if p.requires_grad]
    if fit:
        torch.manual_seed(dist.get_rank())  # rank 0's minibatches are shared out whatever the others draw
        model.fit(maxiter=5, progress=False)
        out["fitted"] = torch.cat([p.detach().reshape(-1) for p in params])
    else:
        loss = model.loss()
        loss = model.engine.agree(loss, [])  # the ranks' shares summed
        out["loss"] = loss.detach().reshape(1)
        grads = torch.autograd.grad(model.loss(), params)
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        model.engine.agree(torch.zeros(()), params)
        out["loss_grad"] = torch.cat([p.grad.reshape(-1) for p in params])
        out["elbo"] = model.factor().elbo.reshape(1)
    pred = model.predict(torch.rand(5, 2, dtype=DTYPE, generator=gen))
    out["mean"], out["grad_variance"] = pred.mean, pred.grad_variance
    return out


def diverged() -> str:
    """Multiply vectors that differ between the ranks: every rank must raise (not hang)."""
    model = model_for(9, 2)
    op = model.engine.operator(model.covar_module, model.data)
    try:
        op.matmul(torch.full((op.shape[-1], 1), 1.0 + dist.get_rank(), dtype=DTYPE))
    except RuntimeError as error:
        return "raised" if "the ranks multiply different vectors" in str(error) else str(error)
    return "passed"


def agreed() -> torch.Tensor:
    """Rank-dependent loss and gradients through the engine's ``agree``: rank 0's ``[0, 1, 2]`` on every rank."""
    rank = dist.get_rank()
    param = torch.zeros(2, dtype=DTYPE, requires_grad=True)
    param.grad = torch.tensor([1.0, 2.0], dtype=DTYPE) + rank
    loss = model_for(9, 2).engine.agree(torch.tensor(float(rank), dtype=DTYPE), [param])
    return torch.cat([loss.reshape(1), param.grad])


def main(directory: str) -> None:
    warnings.simplefilter("ignore")  # maxiter and not-fitted notices
    single = {name: results(*case) for name, case in CASES.items()}
    single["variational"] = variational(fit=False)
    dist.init_process_group("gloo")
    # Rank 1 seeds its probes differently: the ranks must still use rank 0's.
    split = {name: results(*case, seed=dist.get_rank()) for name, case in CASES.items()}
    split["variational"] = variational(fit=False)
    output = {"single": single, "split": split, "diverged": diverged(), "agreed": agreed()}
    output["variational_fit"] = variational(fit=True)
    torch.save(output, f"{directory}/rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
