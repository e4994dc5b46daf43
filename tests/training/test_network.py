import pytest
import torch

from training.network import VelocityMLP, num_parameters


@pytest.mark.parametrize(("dim", "hidden", "layers"), [(2, 64, 3), (5, 16, 1)])
def test_shapes_and_size(dim, hidden, layers):
    net = VelocityMLP(dim, hidden, layers)
    out = net(torch.rand(7, 1), torch.randn(7, dim))
    assert out.shape == (7, dim)
    expected = (
        (dim + 1) * hidden + hidden + (layers - 1) * (hidden * hidden + hidden) + hidden * dim + dim
    )
    assert num_parameters(net) == expected


def test_reference_network_is_about_nine_thousand_floats():
    assert num_parameters(VelocityMLP(2, 64, 3)) == 8706


def test_time_is_the_last_input_column():
    net = VelocityMLP(2, 8, 1)
    t, x = torch.rand(4, 1), torch.randn(4, 2)
    assert torch.equal(net(t, x), net.net(torch.cat([x, t], dim=-1)))


def test_unknown_activation():
    with pytest.raises(ValueError, match=r"^model.activation: unknown 'swish'"):
        VelocityMLP(2, activation="swish")
