import pytest
import torch

from lightning_ft.losses import chunk_cross_entropy, linear_cross_entropy, linear_token_logps


@pytest.mark.parametrize("head_trains", [False, True], ids=["frozen-head", "trained-head"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_linear_cross_entropy_matches_autograd_through_the_head(head_trains, autocast):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(head_trains)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    results = []
    for loss_fn in (lambda: linear_cross_entropy(head, hidden, targets, 5),
                    lambda: chunk_cross_entropy(head, hidden, targets)):
        hidden.grad = head.weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn()
        (3 * loss).backward()  # a non-unit upstream gradient reaches both inputs
        results.append((loss.detach(), hidden.grad, head.weight.grad))
    (loss, grad, weight_grad), (expected, expected_grad, expected_weight_grad) = results
    tolerance = {"rtol": 1e-2, "atol": 1e-2} if autocast else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(loss, expected, **tolerance)
    torch.testing.assert_close(grad, expected_grad, **tolerance)
    if head_trains:
        assert weight_grad.dtype == head.weight.dtype
        torch.testing.assert_close(weight_grad, expected_weight_grad, **tolerance)
    else:
        assert weight_grad is None and expected_weight_grad is None


def test_linear_cross_entropy_runs_heads_it_cannot_fuse_in_checkpointed_chunks(monkeypatch):
    import lightning_ft.losses as losses

    biased = torch.nn.Linear(4, 6)
    wrapped = torch.nn.Sequential(torch.nn.Linear(4, 6, bias=False))
    sharded = torch.nn.Linear(4, 6, bias=False)
    sharded.weight = torch.nn.Parameter(torch.empty(0))  # what FSDP1 or ZeRO-3 leave outside their forward
    hidden, targets = torch.randn(3, 4, requires_grad=True), torch.tensor([0, 1, 2])
    monkeypatch.setattr(losses._LinearCrossEntropy, "apply", None)  # the fused path must not be taken
    for head in (biased, wrapped):
        expected = chunk_cross_entropy(head, hidden, targets)
        torch.testing.assert_close(linear_cross_entropy(head, hidden, targets, 2), expected)
    assert not losses._fusable(sharded)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_token_logps_match_log_softmax_and_its_gradient(dtype):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).to(dtype).requires_grad_(False)
    hidden = torch.randn(23, 16, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    upstream = torch.randn(23, dtype=dtype)  # per-position weights, as a preference loss gives
    values = linear_token_logps(head, hidden, targets, 5)
    (values * upstream).sum().backward()
    fused_grad, hidden.grad = hidden.grad, None
    expected = head(hidden).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    (expected * upstream).sum().backward()
    assert values.dtype == dtype
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(values, expected.detach(), **tolerance)
    torch.testing.assert_close(fused_grad, hidden.grad, **tolerance)


def test_linear_token_logps_leave_a_training_head_to_autograd():
    head = torch.nn.Linear(4, 6, bias=False)
    hidden, targets = torch.randn(3, 4, requires_grad=True), torch.tensor([0, 1, 2])
    assert linear_token_logps(head, hidden, targets, 2) is None
    with torch.no_grad():
        assert linear_token_logps(head.requires_grad_(False), hidden, targets, 2) is None
