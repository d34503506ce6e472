import torch

from tlexp.engine import DeviceSettings, confusion_matrix, evaluate, iterate_batches, train_one_epoch

CPU = DeviceSettings(device=torch.device("cpu"))


def test_training_reduces_loss_and_evaluate_reports_fractions():
    torch.manual_seed(0)
    x = torch.randn(64, 5)
    y = (x[:, 0] > 0).long()
    model = torch.nn.Linear(5, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(0)
    first = train_one_epoch(model, iterate_batches(x, y, torch.arange(64), batch_size=16, settings=CPU,
                                                   shuffle=True, generator=gen), opt, settings=CPU)
    for _ in range(10):
        last = train_one_epoch(model, iterate_batches(x, y, torch.arange(64), batch_size=16, settings=CPU,
                                                      shuffle=True, generator=gen), opt, settings=CPU)
    assert last["loss"] < first["loss"] and last["samples"] == 64
    result = evaluate(model, iterate_batches(x, y, torch.arange(64), batch_size=64, settings=CPU), settings=CPU)
    assert 0.9 <= result["acc"] <= 1.0
    assert torch.equal(result["target"], y)


def test_iterate_batches_shuffles_with_its_generator_only():
    x = torch.arange(10).float().unsqueeze(1)
    y = torch.arange(10)
    order = lambda seed: torch.cat([b for _, b in iterate_batches(x, y, torch.arange(10), batch_size=3,  # noqa: E731
                                                                   settings=CPU, shuffle=True,
                                                                   generator=torch.Generator().manual_seed(seed))])
    assert torch.equal(order(1), order(1)) and not torch.equal(order(1), order(2))
    assert sorted(order(1).tolist()) == list(range(10))


def test_confusion_matrix_rows_are_true_classes():
    cm = confusion_matrix(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 0, 1, 2]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
