import pytest

from tlexp.config import ConfigError, TrainConfig


def test_resolve_fills_dataset_dependent_defaults():
    assert TrainConfig(data="digits").resolve().image_size == 64
    assert TrainConfig(data="/some/photos").resolve().image_size == 224
    assert TrainConfig(image_size=96).resolve().image_size == 96
    cfg = TrainConfig(strategy="scratch", seed=3, samples_per_class=5).resolve()
    assert cfg.run_name == "scratch-efficientnet_lite0-s3-n5"


def test_params_round_trip():
    cfg = TrainConfig(strategy="finetune", lr=3e-4, samples_per_class=7, weights=None, compile=True).resolve()
    params = cfg.to_params()
    assert params["samples_per_class"] == "7" and params["weights"] == "none" and params["dataset"] == "digits"
    assert TrainConfig.from_params(params) == cfg
    all_cfg = TrainConfig().resolve()
    assert all_cfg.to_params()["samples_per_class"] == "all"
    assert TrainConfig.from_params(all_cfg.to_params()).samples_per_class is None


@pytest.mark.parametrize("changes, needle", [
    ({"epochs": 0}, "--epochs"), ({"lr": 0.0}, "--lr"), ({"lr": -1.0}, "--lr"), ({"batch_size": 0}, "--batch-size"),
    ({"val_fraction": 1.0}, "--val-fraction"), ({"val_fraction": 0.0}, "--val-fraction"),
    ({"strategy": "magic"}, "'magic'"), ({"device": "tpu"}, "'tpu'"), ({"head": "big"}, "'big'"),
    ({"samples_per_class": 0}, "--samples-per-class"), ({"image_size": 4}, "--image-size"),
])
def test_validate_names_the_bad_value(changes, needle):
    with pytest.raises(ConfigError) as err:
        TrainConfig(**changes).validate()
    assert needle in str(err.value)
    assert str(err.value).count("\n") == 0


def test_identity_leaves_out_settings_the_strategy_does_not_read():
    from tlexp.config import TrainConfig

    base = TrainConfig(model="tinycnn", image_size=12)
    for strategy, unread in (("scratch", {"lp_epochs": 3, "backbone_lr_mult": 0.5, "feature_cache_views": 2}),
                             ("transfer", {"lp_epochs": 3, "backbone_lr_mult": 0.5}),
                             ("finetune", {"lp_epochs": 3, "feature_cache": "off"})):
        cfg = base.replace(strategy=strategy)
        assert cfg.identity_key() == cfg.replace(**unread).identity_key(), strategy
    lpft = base.replace(strategy="lpft", epochs=6)
    for read in ({"lp_epochs": 3}, {"backbone_lr_mult": 0.5}, {"feature_cache_views": 2}, {"lr": 0.01}):
        assert lpft.identity_key() != lpft.replace(**read).identity_key(), read
