"""Models: timm backbones with one input channel, heads, freezing policies, body-part fallback, safe weight loading."""

from __future__ import annotations

import hashlib
import pickle

import pytest
import timm
import torch

from mura_ray.config import UserError
from mura_ray.exported import ModelSpec
from mura_ray.models import (
    UNKNOWN_BODY_PART,
    build_model,
    build_trunk,
    export_model,
    load_model,
    predict,
)


@pytest.mark.parametrize("backbone", ["custom_cnn", "resnet50", "densenet169", "efficientnet_b0"])
def test_backbone_forward_backward_on_one_channel(backbone):
    model = build_model(backbone)
    model.train()
    x = torch.randn(2, 1, 32, 32)
    out = model(x, torch.tensor([0, 6]))
    assert out["abnormal"].shape == (2,) and out["body_part"].shape == (2, 7)
    (out["abnormal"].sum() + out["body_part"].sum()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_fixed_size_backbones_are_built_for_the_input_size():
    """A vision transformer is built at --image-size (timm's default is 224); convolutional ones take any size."""
    model = build_model("vit_tiny_patch16_224", image_size=64)
    assert tuple(model.trunk.patch_embed.img_size) == (64, 64)
    out = model(torch.randn(2, 1, 64, 64), torch.tensor([0, 1]))
    assert out["abnormal"].shape == (2,)
    # A ResNet has no input size: image_size does not reach it (timm's ResNet takes no img_size) nor changes it.
    resnet = build_trunk("resnet18", image_size=64)
    shapes = {k: v.shape for k, v in build_trunk("resnet18").state_dict().items()}
    assert {k: v.shape for k, v in resnet.state_dict().items()} == shapes
    assert resnet(torch.randn(2, 1, 64, 64)).shape == resnet(torch.randn(2, 1, 96, 96)).shape == (2, 512)


def test_unknown_backbone_suggests_a_name():
    with pytest.raises(UserError, match="Did you mean 'resnet50'"):
        build_model("resnet5O")


@pytest.mark.parametrize(
    ("backbone", "first_trainable"),
    [("resnet50", "layer4."), ("densenet169", "features.transition3."), ("efficientnet_b0", "blocks.5."),
     ("custom_cnn", "blocks.2.")],
)
def test_freeze_policies(backbone, first_trainable):
    free = build_model(backbone, freeze="none")
    assert all(p.requires_grad for p in free.parameters())

    frozen = build_model(backbone, freeze="all")
    assert not any(p.requires_grad for p in frozen.trunk.parameters())
    assert all(p.requires_grad for p in frozen.heads.parameters())
    frozen.train()
    # A frozen feature extractor keeps its batch-norm statistics.
    assert not frozen.trunk.training and frozen.heads.training

    last = build_model(backbone, freeze="all-but-last")
    names = [n for n, p in last.trunk.named_parameters() if p.requires_grad]
    assert names and names[0].startswith(first_trainable)
    frozen_names = [n for n, p in last.trunk.named_parameters() if not p.requires_grad]
    assert frozen_names and not any(n.startswith(first_trainable) for n in frozen_names)
    # Everything after the first trainable parameter trains: a suffix of the trunk.
    order = [n for n, _ in last.trunk.named_parameters()]
    assert order[len(frozen_names):] == names


def test_frozen_stages_keep_their_batch_norm_statistics():
    """`all-but-last`: a training step updates the last stage's batch-norm statistics, not the frozen stages'."""
    model = build_model("resnet18", freeze="all-but-last")
    model.train()
    frozen_bn, last_bn = model.trunk.layer1[0].bn1, model.trunk.layer4[0].bn1
    assert not frozen_bn.training and last_bn.training and model.heads.training
    before = {n: b.clone() for n, b in model.trunk.named_buffers()}
    model(torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 2, 3]))
    changed = {n for n, b in model.trunk.named_buffers() if not torch.equal(b, before[n])}
    assert changed and all(n.startswith("layer4.") for n in changed)
    model.eval()
    assert not last_bn.training


def _refusal(backbone: str, path) -> str:
    with pytest.raises(UserError, match=f"does not fit {backbone}: ") as e:
        build_trunk(backbone, pretrained_file=str(path))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_weight_files_that_do_not_fit_are_user_errors(tmp_path):
    from safetensors.torch import save_file

    vit = tmp_path / "vit.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224").state_dict(), str(vit))
    message = _refusal("resnet18", vit)
    assert "missing keys (conv1.weight" in message and "unexpected keys (blocks." in message
    efficientnet = tmp_path / "efficientnet_b0.safetensors"  # shares names such as bn1.weight, with other shapes
    save_file(timm.create_model("efficientnet_b0").state_dict(), str(efficientnet))
    _refusal("resnet18", efficientnet)
    deeper = tmp_path / "resnet34.safetensors"
    save_file(timm.create_model("resnet34", num_classes=0).state_dict(), str(deeper))
    message = _refusal("resnet18", deeper)
    assert "unexpected keys (layer1.2." in message and "missing keys" not in message
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in timm.create_model("resnet18").state_dict().items() if not k.startswith("layer4.")},
              str(partial))
    assert "missing keys (layer4.0." in _refusal("resnet18", partial)
    wider = tmp_path / "vit_small.safetensors"
    save_file(timm.create_model("vit_small_patch16_224").state_dict(), str(wider))
    assert "size mismatch" in _refusal("vit_tiny_patch16_224", wider)
    two_channels = tmp_path / "two_channels.safetensors"
    save_file(timm.create_model("resnet18", in_chans=2).state_dict(), str(two_channels))
    assert "size mismatch for conv1.weight" in _refusal("resnet18", two_channels)

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot load weights"):
        build_trunk("resnet18", pretrained_file=str(corrupt))


def test_body_part_fallback_uses_prediction_when_unknown():
    torch.manual_seed(0)
    model = build_model("custom_cnn").eval()
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        predicted = model(x)["body_part"].argmax(1)
        unknown = model(x, torch.full((3,), UNKNOWN_BODY_PART))["abnormal"]
        given_pred = model(x, predicted)["abnormal"]
        other = model(x, (predicted + 1) % 7)["abnormal"]
    torch.testing.assert_close(unknown, given_pred)
    assert not torch.allclose(unknown, other)


def test_the_unknown_body_part_row_is_zero_and_never_trained():
    """Without the auxiliary head, rows without a body part use the embedding's extra row. Training rows all have
    one, so a trainable row would stay at its random initialisation: it is zero and gets no gradient."""
    torch.manual_seed(0)
    model = build_model("custom_cnn", multitask=False).train()
    unknown = model.body_part_embed.weight[model.num_body_parts]
    assert torch.count_nonzero(unknown) == 0
    out = model(torch.randn(4, 1, 32, 32), torch.tensor([0, 3, -1, 6]))["abnormal"]
    out.sum().backward()
    grad = model.body_part_embed.weight.grad
    assert torch.count_nonzero(grad[model.num_body_parts]) == 0 and torch.count_nonzero(grad[3]) > 0


def test_switches_turn_off_embedding_and_aux_head():
    model = build_model("custom_cnn", multitask=False, body_part_embedding=False).eval()
    out = model(torch.randn(2, 1, 32, 32))
    assert set(out) == {"abnormal"} and model.body_part_embed is None
    no_head = build_model("custom_cnn", multitask=False).eval()
    # Without the auxiliary head an unknown body part uses the "unknown" embedding row.
    assert set(no_head(torch.randn(2, 1, 32, 32), torch.tensor([-1, 3]))) == {"abnormal"}


def test_pretrained_file_adapts_rgb_stem_to_one_channel(tmp_path):
    """An RGB state dict loads into the one-channel trunk: the stem sums its channels, the classifier (which the
    trunk has none of) is left out, and every other tensor is the file's."""
    from safetensors.torch import save_file

    source = timm.create_model("resnet18", in_chans=3, num_classes=10).state_dict()
    path = tmp_path / "resnet18.safetensors"
    save_file(source, str(path))
    trunk = build_trunk("resnet18", pretrained_file=str(path))
    loaded = trunk.state_dict()
    torch.testing.assert_close(loaded["conv1.weight"], source["conv1.weight"].sum(1, keepdim=True))
    rest = [k for k in source if k != "conv1.weight" and not k.startswith("fc.")]
    assert sorted(rest) == sorted(k for k in loaded if k != "conv1.weight")
    for key in rest:
        assert torch.equal(loaded[key], source[key]), key

    pth = tmp_path / "resnet18.pth"
    torch.save({"state_dict": source}, pth)
    from_pth = build_trunk("resnet18", pretrained_file=str(pth)).state_dict()
    assert all(torch.equal(from_pth[k], loaded[k]) for k in loaded)


def test_pretrained_vision_transformer_file_is_resampled_to_the_input_size(tmp_path):
    """timm's checkpoint filter resamples the 224-pixel position embeddings for a trunk built at image_size 64."""
    from safetensors.torch import save_file

    source = timm.create_model("vit_tiny_patch16_224", num_classes=10).state_dict()
    path = tmp_path / "vit.safetensors"
    save_file(source, str(path))
    trunk = build_trunk("vit_tiny_patch16_224", pretrained_file=str(path), image_size=64)
    loaded = trunk.state_dict()
    assert loaded["pos_embed"].shape == (1, 1 + 4 * 4, 192)
    torch.testing.assert_close(loaded["patch_embed.proj.weight"],
                               source["patch_embed.proj.weight"].sum(1, keepdim=True))
    assert torch.equal(loaded["blocks.11.mlp.fc2.weight"], source["blocks.11.mlp.fc2.weight"])
    assert trunk(torch.randn(2, 1, 64, 64)).shape == (2, 192)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_untrusted_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"weights": _Evil()}, f)
    with pytest.raises(UserError, match="cannot load weights"):
        build_trunk("resnet18", pretrained_file=str(path))


def test_export_and_load_round_trip(tmp_path):
    model = build_model("custom_cnn", dropout=0.1).eval()
    spec = ModelSpec(backbone="custom_cnn", image_size=32, mean=0.5, std=0.25, dropout=0.1, threshold=0.4)
    model_id = export_model(model, spec, str(tmp_path / "model"), {"backbone": "custom_cnn"})
    loaded, spec2, model_id2 = load_model(str(tmp_path / "model"))
    assert spec2 == spec and model_id2 == model_id
    assert model_id == hashlib.sha256((tmp_path / "model" / "model.safetensors").read_bytes()).hexdigest()[:16]
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["abnormal"], model(x)["abnormal"])
    with pytest.raises(UserError, match="not an exported model directory"):
        load_model(str(tmp_path))


def test_weights_and_models_on_s3(s3_bucket, tmp_path):
    from safetensors.torch import save

    from mura_ray import storage

    with pytest.raises(UserError, match=f"cannot load weights from s3://{s3_bucket}/nope.safetensors"):
        build_trunk("resnet18", pretrained_file=f"s3://{s3_bucket}/nope.safetensors")
    source = timm.create_model("resnet18").state_dict()
    storage.write_bytes(f"s3://{s3_bucket}/resnet18.safetensors", save(source))
    pth = tmp_path / "resnet18.pth"
    torch.save(source, pth)
    storage.write_bytes(f"s3://{s3_bucket}/resnet18.pth", pth.read_bytes())
    for name in ("resnet18.safetensors", "resnet18.pth"):
        trunk = build_trunk("resnet18", pretrained_file=f"s3://{s3_bucket}/{name}")
        assert torch.equal(trunk.layer4[1].conv2.weight, source["layer4.1.conv2.weight"])

    model = build_model("custom_cnn").eval()
    spec = ModelSpec(backbone="custom_cnn", image_size=32, mean=0.5, std=0.25)
    model_id = export_model(model, spec, f"s3://{s3_bucket}/model", {"backbone": "custom_cnn"})
    loaded, spec2, model_id2 = load_model(f"s3://{s3_bucket}/model")
    assert spec2 == spec and model_id2 == model_id
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["abnormal"], model(x)["abnormal"])


def test_tta_averages_the_probabilities_of_the_image_and_its_flip():
    """`predict(tta=True)` gives logits whose sigmoid/softmax are the mean probabilities over the two views, and
    stays finite where a view's probability is 0 or 1 in floating point."""
    torch.manual_seed(0)
    model = build_model("custom_cnn").eval()
    x = torch.rand(3, 1, 32, 32)
    known = torch.tensor([0, -1, 3])
    with torch.inference_mode():
        plain, flipped = model(x, known), model(torch.flip(x, dims=[3]), known)
        merged = predict(model, x, known, tta=True)
        assert predict(model, x, known)["abnormal"].equal(plain["abnormal"])  # without TTA, the model's own
    mean = (torch.sigmoid(plain["abnormal"]) + torch.sigmoid(flipped["abnormal"])) / 2
    torch.testing.assert_close(torch.sigmoid(merged["abnormal"]), mean)
    parts = (torch.softmax(plain["body_part"], 1) + torch.softmax(flipped["body_part"], 1)) / 2
    torch.testing.assert_close(torch.softmax(merged["body_part"], 1), parts)

    class Saturated(torch.nn.Module):
        def forward(self, image, body_part=None):
            return {"abnormal": image.flatten(1)[:, 0] * 1e4}

    out = predict(Saturated(), torch.tensor([1.0, -1.0]).view(2, 1, 1, 1), tta=True)["abnormal"]
    assert torch.isfinite(out).all() and out[0] > 30 and out[1] < -30
