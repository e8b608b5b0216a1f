"""The paper's recipes, YAML configs and their validation."""
import pytest

from densenet.training.config import ConfigError, TrainConfig, milestones, paper_recipe, resolve_config
from densenet.training.loop import learning_rate


@pytest.mark.parametrize(
    "dataset, epochs, batch, drop, lr_at",
    [
        ("cifar10", 300, 64, 0.2, {0: 0.1, 149: 0.1, 150: 0.01, 224: 0.01, 225: 0.001, 299: 0.001}),
        ("cifar10+", 300, 64, 0.0, {150: 0.01}),
        ("cifar100", 300, 64, 0.2, {225: 0.001}),
        ("cifar100+", 300, 64, 0.0, {149: 0.1}),
        ("svhn", 40, 64, 0.2, {19: 0.1, 20: 0.01, 30: 0.001}),
        ("imagenet", 90, 256, 0.0, {29: 0.1, 30: 0.01, 59: 0.01, 60: 0.001}),
    ],
)
def test_paper_recipe(dataset, epochs, batch, drop, lr_at):
    config = resolve_config({"dataset": dataset, "data": "data/" + dataset})
    assert (config.model, config.epochs, config.batch_size, config.drop_rate) == ("densenet_bc100_k12", epochs, batch, drop)
    assert (config.lr, config.momentum, config.nesterov, config.weight_decay) == (0.1, 0.9, True, 1e-4)
    for epoch, lr in lr_at.items():
        assert learning_rate(config, epoch) == pytest.approx(lr)


@pytest.mark.parametrize("given", [{}, {"dataset": "cifar10"}, {"dataset": "cifar100+"}])
def test_the_bundled_sample_gets_a_short_demo_recipe(given):
    """No --data: the bundled 1,000-image sample, trained briefly by a small model (not 300 epochs of
    BC-100); what the user gives still wins, and --data brings the paper's recipe back."""
    config = resolve_config(given)
    assert (config.model, config.epochs, config.data) == ("densenet_bc40_k12", 8, None)
    assert (config.lr, config.batch_size, config.nesterov) == (0.1, 64, True)  # the paper's optimiser
    assert milestones(config) == [4, 6]
    assert resolve_config({**given, "epochs": 30, "model": "densenet40_k12"}).epochs == 30
    paper = resolve_config({**given, "data": "cifar-10-binary.tar.gz"})
    assert (paper.model, paper.epochs) == ("densenet_bc100_k12", 300)


def test_schedule_follows_overridden_epochs():
    assert milestones(resolve_config({"dataset": "cifar10+", "epochs": 20})) == [10, 15]
    assert milestones(resolve_config({"dataset": "imagenet", "epochs": 9})) == [3, 6]
    assert milestones(resolve_config({"dataset": "cifar10+", "epochs": 20, "lr_milestones": [5]})) == [5]


def test_yaml_file_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: densenet40_k12\nepochs: 7\nlr: 0.05\nnesterov: false\n")
    config = resolve_config({"lr": 0.2}, path)
    assert (config.model, config.epochs, config.lr, config.nesterov) == ("densenet40_k12", 7, 0.2, False)


@pytest.mark.parametrize(
    "text, match",
    [
        ("epochz: 3\n", r"unknown key\(s\) epochz; valid keys: model, dataset"),
        ("epochs: three\n", r"wrong type for epochs='three' \(expected int\)"),
        ("lr: [1]\n", "wrong type for lr"),
        ("- 1\n- 2\n", "must hold a mapping"),
        ("a: [\n", "not valid YAML"),
        ("epochs: 0\n", "epochs must be at least 1"),
    ],
)
def test_bad_config_files_name_the_problem(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        resolve_config({}, path)


def test_bad_values_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        resolve_config({}, tmp_path / "none.yaml")
    with pytest.raises(ConfigError, match="drop_rate must be in"):
        resolve_config({"drop_rate": 1.5})
    with pytest.raises(ConfigError, match="lr_milestones must lie in 1..epochs"):
        resolve_config({"epochs": 10, "lr_milestones": [20]})


def test_every_key_has_a_default():
    assert TrainConfig().to_dict()["model"] == "densenet_bc100_k12"
    assert paper_recipe("folder")["drop_rate"] == 0.0
