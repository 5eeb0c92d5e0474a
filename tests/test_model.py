import pytest
import timm
import torch

from mineralnet.errors import MineralNetError
from mineralnet.model import FusionNet, parse_stages

# The paper's Table 4 fusion sizes for ResNet-50 (256, 512, 1024, 2048 channels at Layer1..4).
TABLE4 = {(4,): 2048, (1, 4): 2304, (2, 4): 2560, (3, 4): 3072, (2, 3, 4): 3584, (1, 2, 3, 4): 3840}


@pytest.mark.parametrize("stages,dim", list(TABLE4.items()))
def test_resnet50_feature_dim_matches_table4(stages, dim):
    with torch.device("meta"):
        m = FusionNet("resnet50", stages, num_classes=22)
    assert m.feature_dim == dim
    assert m.head.in_features == dim and m.head.out_features == 22


def test_embed_equals_manual_pool_of_timm_stages():
    torch.manual_seed(0)
    m = FusionNet("resnet50", (2, 4), num_classes=5).eval()
    ref = timm.create_model("resnet50", features_only=True, out_indices=(2, 4))
    ref.load_state_dict(m.backbone.state_dict())
    ref.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        f2, f4 = ref(x)
        manual = torch.cat([f2.mean((2, 3)), f4.mean((2, 3))], 1)  # (2, 2560)
        emb = m.embed(x)
        logits = m(x)
    assert emb.shape == (2, 2560)
    torch.testing.assert_close(emb, manual)
    torch.testing.assert_close(logits, manual @ m.head.weight.T + m.head.bias)


@pytest.mark.parametrize("backbone,stages", [("resnet18", (2, 4)), ("resnet18", (1, 2, 3, 4)), ("resnet18", (3,))])
def test_every_parameter_gets_a_gradient(backbone, stages):
    torch.manual_seed(0)
    m = FusionNet(backbone, stages, num_classes=3)
    out = m(torch.randn(4, 3, 64, 64))
    assert torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    assert all(p.grad.abs().sum() > 0 for n, p in m.named_parameters() if n.startswith("head"))


@pytest.mark.parametrize("backbone", ["vgg16", "inception_v3", "efficientnet_b0"])
def test_paper_backbones_build_with_sizes_from_feature_info(backbone):
    with torch.device("meta"):
        m = FusionNet(backbone, (2, 4), num_classes=22)
        probe = timm.create_model(backbone, features_only=True)
    chans = probe.feature_info.channels()
    assert m.feature_dim == chans[-3] + chans[-1]  # stages 2 and 4 = last four levels' 2nd and 4th


def test_forward_return_features_and_channels_last():
    m = FusionNet("resnet18", (2, 4), num_classes=3).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    logits, feats = m(x, return_features=True)
    assert logits.shape == (2, 3) and feats.shape == (2, m.feature_dim) and m.feature_dim == 128 + 512


def test_local_pretrained_file_roundtrip(tmp_path):
    from safetensors.torch import save_file
    src = timm.create_model("resnet18", num_classes=1000)
    path = tmp_path / "r18.safetensors"
    save_file(src.state_dict(), str(path))
    m = FusionNet("resnet18", (2, 4), num_classes=3, pretrained=str(path))
    torch.testing.assert_close(m.backbone.conv1.weight, src.conv1.weight)
    torch.testing.assert_close(m.backbone.layer4[0].conv1.weight, src.layer4[0].conv1.weight)


def test_bad_inputs_are_clear_errors(tmp_path):
    for bad in ("", "0", "5", "2,x"):
        with pytest.raises(MineralNetError, match="stage"):
            parse_stages(bad)
    with pytest.raises(MineralNetError, match="does not exist"):
        FusionNet("resnet18", (4,), 3, pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(MineralNetError, match="unknown or unsupported backbone"):
        FusionNet("no_such_net", (4,), 3)
    (tmp_path / "junk.safetensors").write_bytes(b"not weights")
    with pytest.raises(MineralNetError, match="do not fit"):
        FusionNet("resnet18", (4,), 3, pretrained=str(tmp_path / "junk.safetensors"))
