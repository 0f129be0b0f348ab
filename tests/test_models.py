"""Model loading: supported backbones, safe checkpoints with clear refusals, sidecars, dropout variant."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import xrcam
from xrcam.errors import XrcamCheckpointError, XrcamConfigError
from xrcam.models import (
    SUPPORTED_MODELS,
    add_stage_dropout,
    file_sha256,
    model_normalisation,
    read_checkpoint_sidecar,
    save_checkpoint,
)


@pytest.mark.parametrize("name", SUPPORTED_MODELS)
def test_supported_models_build_in_eval_mode_with_four_stages(name):
    model = xrcam.load_model(name, num_classes=3)
    assert not any(m.training for m in model.modules())
    assert model.get_classifier().out_features == 3
    out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 3)
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        assert isinstance(model.get_submodule(stage), nn.Sequential)


def test_unknown_model_and_bad_class_count_are_refused():
    with pytest.raises(XrcamConfigError, match="not supported"):
        xrcam.load_model("vit_base_patch16_224")
    with pytest.raises(XrcamConfigError, match="at least 2"):
        xrcam.load_model("resnet18", num_classes=1)


def test_normalisation_comes_from_the_timm_config():
    mean, std = model_normalisation(xrcam.load_model("resnet18"))
    assert mean == pytest.approx((0.485, 0.456, 0.406))
    assert std == pytest.approx((0.229, 0.224, 0.225))


def test_checkpoint_round_trip_with_sidecar(tmp_path):
    torch.manual_seed(1)
    model = xrcam.load_model("resnet18", num_classes=2)
    path = save_checkpoint(
        model, tmp_path / "model.pt", {"model": "resnet18", "classes": ["a", "b"], "dropout": None}
    )
    assert read_checkpoint_sidecar(path)["classes"] == ["a", "b"]
    assert json.loads((tmp_path / "model.pt.json").read_text())["model"] == "resnet18"
    loaded = xrcam.load_model("resnet18", num_classes=2, checkpoint=path)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    assert loaded.xrcam_checkpoint["sha256"] == file_sha256(path)
    assert loaded.xrcam_checkpoint["sidecar"]["model"] == "resnet18"
    assert read_checkpoint_sidecar(tmp_path / "missing.pt") is None


def test_dropout_variant_keeps_state_dict_keys_and_loads_plain_checkpoints(tmp_path):
    plain = xrcam.load_model("resnet18", num_classes=2)
    path = save_checkpoint(plain, tmp_path / "plain.pt")
    variant = xrcam.load_model("resnet18", num_classes=2, checkpoint=path, dropout=0.1)
    assert list(variant.state_dict()) == list(plain.state_dict())
    drops = [m for m in variant.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 4 and all(d.p == 0.1 for d in drops)
    assert all(isinstance(variant.get_submodule(f"layer{i}")[-1], nn.Dropout) for i in range(1, 5))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(variant(x), plain(x))  # eval: dropout is the identity
    back = save_checkpoint(variant, tmp_path / "variant.pt")
    xrcam.load_model("resnet18", num_classes=2, checkpoint=back)  # and back into a plain model
    with pytest.raises(XrcamConfigError, match="between 0 and 1"):
        add_stage_dropout(xrcam.load_model("resnet18"), 1.5)


def test_nested_state_dict_and_module_prefix_are_accepted(tmp_path):
    model = xrcam.load_model("resnet18", num_classes=2)
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "ddp.pth"
    )
    loaded = xrcam.load_model("resnet18", num_classes=2, checkpoint=tmp_path / "ddp.pth")
    assert torch.equal(loaded.fc.weight, model.fc.weight)


def test_class_count_mismatch_says_which(tmp_path):
    path = save_checkpoint(xrcam.load_model("resnet18", num_classes=3), tmp_path / "three.pt")
    with pytest.raises(XrcamCheckpointError, match="checkpoint has 3 classes, model asks for 2"):
        xrcam.load_model("resnet18", num_classes=2, checkpoint=path)
    # fine-tuning start: keep the model's own classifier
    model = xrcam.load_model("resnet18", num_classes=2, checkpoint=path, ignore_classifier=True)
    assert model.fc.out_features == 2


def test_sidecar_contradicting_the_request_is_refused(tmp_path):
    model = xrcam.load_model("resnet18", num_classes=2)
    path = save_checkpoint(model, tmp_path / "m.pt", {"model": "resnet34", "classes": ["a", "b"]})
    with pytest.raises(XrcamCheckpointError, match="trained as 'resnet34'"):
        xrcam.load_model("resnet18", num_classes=2, checkpoint=path)
    path = save_checkpoint(model, tmp_path / "n.pt", {"model": "resnet18", "classes": ["a", "b", "c"]})
    with pytest.raises(XrcamCheckpointError, match="has 3 classes"):
        xrcam.load_model("resnet18", num_classes=2, checkpoint=path)


def test_architecture_mismatch_is_named(tmp_path):
    path = save_checkpoint(xrcam.load_model("resnet34", num_classes=2), tmp_path / "r34.pt")
    with pytest.raises(
        XrcamCheckpointError, match="do not fit resnet18.*matches resnet34: pass --model resnet34"
    ):
        xrcam.load_model("resnet18", num_classes=2, checkpoint=path)
    path = save_checkpoint(xrcam.load_model("skresnet18", num_classes=2), tmp_path / "sk.pt")
    with pytest.raises(
        XrcamCheckpointError,
        match=r"do not fit resnet18.*unexpected: layer1\.0\.conv1\.attn.*matches skresnet18",
    ):
        xrcam.load_model("resnet18", num_classes=2, checkpoint=path)


class _Payload:
    """Unpickling this would run a shell command: the loader must never get that far."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"fc.weight": torch.zeros(2, 512), "payload": _Payload(marker)}, path)
    with pytest.raises(XrcamCheckpointError, match="pickled Python objects"):
        xrcam.load_model("resnet18", num_classes=2, checkpoint=path)
    assert not marker.exists()


def test_unreadable_and_missing_checkpoints(tmp_path):
    with pytest.raises(XrcamCheckpointError, match="not found"):
        xrcam.load_model("resnet18", checkpoint=tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(XrcamCheckpointError, match="junk.pt"):
        xrcam.load_model("resnet18", checkpoint=junk)
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(XrcamCheckpointError, match="expected a state_dict"):
        xrcam.load_model("resnet18", checkpoint=tmp_path / "list.pt")


@pytest.mark.parametrize("name", SUPPORTED_MODELS)
def test_stage_names_read_from_the_model_input_side_first(name):
    """Read from the model; ``run``'s one default stage list (``DEFAULT_LAYERS``) is every supported model's."""
    import timm

    from workflows.settings import DEFAULT_LAYERS
    from xrcam.models import stage_names

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=2)
    assert stage_names(model) == ("layer1", "layer2", "layer3", "layer4") == DEFAULT_LAYERS
    plain = nn.Sequential()
    plain.add_module("layer2", nn.Identity())
    plain.add_module("layer10", nn.Identity())
    plain.add_module("fc", nn.Identity())
    assert stage_names(plain) == ("layer2", "layer10")


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_training_script_wrappers_and_nested_dataparallel_load(tmp_path):
    import argparse

    model = xrcam.load_model("resnet18", num_classes=2, seed=3)
    weights = _weights(model)
    # torchvision/timm train scripts: weights under "model", beside optimizer state and argparse options
    torch.save(
        {
            "model": weights,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
            "epoch": 7,
            "args": argparse.Namespace(arch="resnet18", lr=0.1),
        },
        tmp_path / "train.pth",
    )
    torch.save({"state_dict": {f"module.module.{k}": v for k, v in weights.items()}}, tmp_path / "ddp.pt")
    torch.save({"model_state_dict": weights, "epoch": 1}, tmp_path / "msd.pt")
    for name in ("train.pth", "ddp.pt", "msd.pt"):
        assert _same(xrcam.load_model("resnet18", num_classes=2, checkpoint=tmp_path / name), model), name


def test_safetensors_checkpoint_loads_and_a_damaged_one_is_named(tmp_path):
    from safetensors.torch import save_file

    model = xrcam.load_model("resnet18", num_classes=2, seed=4)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "m.safetensors")
    assert _same(xrcam.load_model("resnet18", num_classes=2, checkpoint=tmp_path / "m.safetensors"), model)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(XrcamCheckpointError, match="bad.safetensors: not a readable safetensors"):
        xrcam.load_model("resnet18", num_classes=2, checkpoint=tmp_path / "bad.safetensors")


def test_torchvision_resnet50_checkpoint_loads_into_timm_resnet50_with_equal_outputs(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(num_classes=3).eval()
    for m in reference.modules():  # non-trivial batch-norm statistics, so a wrong mapping would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    torch.save(reference.state_dict(), tmp_path / "tv.pth")
    from xrcam.models import check_checkpoint

    assert check_checkpoint("resnet50", tmp_path / "tv.pth") == 3
    model = xrcam.load_model("resnet50", num_classes=3, checkpoint=tmp_path / "tv.pth")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_check_checkpoint_on_the_meta_device_names_class_count_and_keys(tmp_path):
    from xrcam.models import check_checkpoint

    path = save_checkpoint(xrcam.load_model("resnet18", num_classes=3), tmp_path / "three.pt")
    assert check_checkpoint("resnet18", path) == 3
    with pytest.raises(XrcamCheckpointError, match="checkpoint has 3 classes, model asks for 2"):
        check_checkpoint("resnet18", path, 2)
    state = torch.load(path, weights_only=True)
    state["layer9.weight"] = state.pop("layer4.1.bn2.weight")
    torch.save(state, tmp_path / "renamed.pt")
    with pytest.raises(
        XrcamCheckpointError, match=r"missing: layer4\.1\.bn2\.weight; unexpected: layer9\.weight"
    ):
        check_checkpoint("resnet18", tmp_path / "renamed.pt")


def test_seeded_random_init_is_reproducible_and_leaves_the_global_generator_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = xrcam.load_model("resnet18", num_classes=2, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    b = xrcam.load_model("resnet18", num_classes=2, seed=7)
    assert _same(a, b)
    assert not _same(a, xrcam.load_model("resnet18", num_classes=2, seed=8))
