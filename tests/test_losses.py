"""CenterLoss (Wen et al. 2016; PCA-Net eq. 6) and ContrastiveLoss (CIN eq. 7–8)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fgattn import CenterLoss, ContrastiveLoss


def test_center_loss_value_and_moving_average_counts_every_sample():
    loss_fn = CenterLoss(3, 2, alpha=0.5)
    loss_fn.centers.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]]))
    feats = torch.tensor([[1.0, 0.0], [3.0, 0.0], [1.0, 2.0]])
    labels = torch.tensor([0, 0, 1])
    loss = loss_fn(feats, labels)
    # ½ ‖x − c_y‖², averaged: (½·1 + ½·9 + ½·1) / 3
    torch.testing.assert_close(loss, torch.tensor((0.5 + 4.5 + 0.5) / 3))
    # Wen et al. eq. 4: Δc_j = Σ (c_j − x_i) / (1 + n_j); both class-0 samples count.
    want0 = (
        torch.tensor([0.0, 0.0]) - 0.5 * (torch.tensor([-1.0, 0.0]) + torch.tensor([-3.0, 0.0])) / 3
    )
    want1 = torch.tensor([1.0, 1.0]) - 0.5 * torch.tensor([0.0, -1.0]) / 2
    torch.testing.assert_close(loss_fn.centers[0], want0)
    torch.testing.assert_close(loss_fn.centers[1], want1)
    torch.testing.assert_close(loss_fn.centers[2], torch.tensor([2.0, 0.0]))  # unseen: unchanged


def test_center_loss_does_not_update_in_eval_and_gives_feature_gradient():
    loss_fn = CenterLoss(2, 3).eval()
    feats = torch.randn(4, 3, requires_grad=True)
    loss_fn(feats, torch.tensor([0, 1, 1, 0])).backward()
    assert torch.count_nonzero(loss_fn.centers) == 0
    torch.testing.assert_close(feats.grad, feats.detach() / 4)  # d/dx ½‖x − 0‖² / B


def test_center_loss_learned_centres_are_a_parameter():
    loss_fn = CenterLoss(2, 3, update="learned")
    assert isinstance(loss_fn.centers, torch.nn.Parameter)
    loss_fn(torch.randn(4, 3), torch.tensor([0, 1, 1, 0])).backward()
    assert loss_fn.centers.grad is not None and loss_fn.centers.grad.abs().sum() > 0
    sd = loss_fn.state_dict()
    clone = CenterLoss(2, 3, update="learned")
    clone.load_state_dict(sd)
    torch.testing.assert_close(clone.centers, loss_fn.centers)


@pytest.mark.parametrize(
    ("feats", "labels", "match"),
    [
        (
            torch.randn(4, 5),
            torch.zeros(4, dtype=torch.long),
            r"features must have shape \(B, 3\).*\(4, 5\)",
        ),
        (
            torch.randn(4, 3),
            torch.zeros(3, dtype=torch.long),
            r"labels must have shape \(4,\).*\(3,\)",
        ),
        (torch.randn(4, 3), torch.zeros(4), r"labels must be integer"),
    ],
)
def test_center_loss_bad_input(feats, labels, match):
    with pytest.raises(ValueError, match=match):
        CenterLoss(2, 3)(feats, labels)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, feats, labels, out, formula):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    loss_fn = CenterLoss(3, 2, alpha=0.5, formula=formula)
    half = feats.shape[0] // world
    for _ in range(2):
        loss_fn(feats[rank * half : (rank + 1) * half], labels[rank * half : (rank + 1) * half])
    out[rank] = loss_fn.centers.clone()
    dist.destroy_process_group()


@pytest.mark.parametrize("formula", ["wen", "official"])
def test_center_loss_centres_identical_across_ranks_under_ddp(formula):
    feats = torch.randn(8, 2)
    labels = torch.tensor([0, 1, 0, 2, 0, 1, 1, 0])
    out = mp.Manager().dict()
    args = (2, _free_port(), feats, labels, out, formula)
    mp.spawn(_ddp_worker, args=args, nprocs=2, join=True)
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)
    assert out[0].abs().sum() > 0
    if formula == "official":  # each class: the mean of the ranks' last-sample steps
        return
    single = CenterLoss(3, 2, alpha=0.5)
    for _ in range(2):
        single(feats, labels)  # the whole batch on one process
    torch.testing.assert_close(out[0], single.centers)


def test_contrastive_loss_matches_equation_8():
    a = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[0.3, 0.4], [0.3, 0.0], [3.0, 4.0]])
    same = torch.tensor([True, False, False])
    loss = ContrastiveLoss(margin=0.5)(a, b, same)
    # positive: d² = 0.25; negative d = 0.3: (0.5 − 0.3)² = 0.04; negative d = 5 > β: 0
    torch.testing.assert_close(loss, torch.tensor((0.25 + 0.04 + 0.0) / 3))


def test_contrastive_loss_identical_negative_pair_has_finite_gradient():
    a = torch.ones(2, 4, requires_grad=True)
    loss = ContrastiveLoss()(a, a.detach().clone(), torch.tensor([0, 0]))
    loss.backward()
    assert loss.item() == pytest.approx(0.25, abs=1e-5)
    assert torch.isfinite(a.grad).all()


def test_contrastive_loss_bad_input():
    with pytest.raises(ValueError, match=r"emb_a and emb_b must both have shape \(N, D\)"):
        ContrastiveLoss()(torch.randn(3, 4), torch.randn(3, 5), torch.ones(3))
    with pytest.raises(ValueError, match=r"same must have shape \(3,\)"):
        ContrastiveLoss()(torch.randn(3, 4), torch.randn(3, 4), torch.ones(2))
