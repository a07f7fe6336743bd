"""Float8Linear under autograd: gradients equal an nn.Linear holding the same dequantized weight
(through a peft LoRA too), only the fp8 weight is saved for backward (no bf16 copy per layer),
and it works inside torch.utils.checkpoint and under inference_mode."""
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from loralab.core.families.parts.fp8 import Float8Linear


class Reference(nn.Linear):
    """An nn.Linear that, like Float8Linear, takes its input in its own dtype."""

    def forward(self, x):
        return super().forward(x.to(self.weight.dtype))


def fp8_pair(in_features=64, out_features=48, compute_dtype=torch.float32, per_row=False, seed=0,
             weight_dtype=None):
    """(Float8Linear, nn.Linear holding its weight dequantized in weight_dtype (the dtype it
    computes in: compute_dtype or autocast's), and its bias)."""
    weight_dtype = weight_dtype or compute_dtype
    torch.manual_seed(seed)
    source = nn.Linear(in_features, out_features)
    layer = Float8Linear.from_linear(source, compute_dtype)
    if per_row:
        rows = torch.rand(out_features) + 0.5
        layer.set_weight(layer.weight, layer.weight_scale * rows)
    reference = Reference(in_features, out_features, dtype=weight_dtype)
    with torch.no_grad():
        reference.weight.copy_(layer.dequantized_weight(weight_dtype))
        reference.bias.copy_(layer.bias)
    reference.requires_grad_(False)
    return layer, reference


def input_grad(module, x, autocast=None):
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        out = module(x)
    out.float().square().sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("compute_dtype, autocast, tolerance", [
    (torch.float32, None, 1e-6), (torch.bfloat16, None, 0), (torch.float32, torch.bfloat16, 0),
    (torch.bfloat16, torch.bfloat16, 0)])
def test_input_gradient_equals_a_linear_with_the_dequantized_weight(per_row, compute_dtype, autocast,
                                                                     tolerance):
    layer, reference = fp8_pair(compute_dtype=compute_dtype, per_row=per_row, weight_dtype=autocast)
    x = torch.randn(2, 5, 64)
    out, grad = input_grad(layer, x, autocast)
    expected_out, expected_grad = input_grad(reference, x, autocast)
    assert out.dtype == expected_out.dtype and grad.dtype == x.dtype
    torch.testing.assert_close(out, expected_out, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(grad, expected_grad, atol=tolerance, rtol=tolerance)
    assert layer.weight.grad is None and layer.weight.dtype == torch.float8_e4m3fn


def test_a_trainable_bias_gets_its_gradient():
    layer, reference = fp8_pair()
    layer.bias.requires_grad_(True)
    reference.bias.requires_grad_(True)
    x = torch.randn(3, 7, 64)
    for module in (layer, reference):
        module(x).square().sum().backward()
    torch.testing.assert_close(layer.bias.grad, reference.bias.grad)


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_lora_gradients_through_peft_equal_the_reference(autocast):
    from peft import LoraConfig, inject_adapter_in_model

    models = []
    for pick in (0, 1):
        model = nn.Sequential(fp8_pair(64, 64, torch.bfloat16, seed=0)[pick], nn.GELU(),
                              fp8_pair(64, 64, torch.bfloat16, seed=1)[pick])
        model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["0", "2"]),
                                        model)
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = torch.randn_like(p, dtype=torch.float32) * 0.05
        models.append(model)
    assert isinstance(models[0][0].base_layer, Float8Linear)
    x = torch.randn(2, 9, 64)
    grads = []
    for model in models:
        input_grad(model, x, autocast)
        grads.append({n: p.grad for n, p in model.named_parameters() if "lora_" in n})
    assert len(grads[0]) == 4 and grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert grads[0][name].abs().sum() > 0
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=0, rtol=0)


def saved_bytes(model, x, exclude=()):
    """Bytes of the tensors autograd saves for backward over one forward under bf16 autocast,
    leaving out tensors that share storage with `exclude` (weights held anyway)."""
    held = {t.untyped_storage().data_ptr() for t in exclude}
    total = [0]

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in held:
            total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    return total[0], out


def test_autograd_saves_no_bf16_weight_copy():
    """8 layers of 2048 x 2048: the old forward (F.linear on the upcast weight) saved
    8 * 2048 * 2048 * 2 bytes (64 MiB) of bf16 weights; now only the fp8 weights, which are the
    layers' own storage (nothing new), and nothing else."""
    layers, width = 8, 2048
    torch.manual_seed(0)
    model = nn.Sequential(*[Float8Linear(width, width, bias=False) for _ in range(layers)])
    for layer in model:
        layer.set_weight((torch.randn(width, width) * 0.02).to(torch.float8_e4m3fn), torch.ones(1))
    x = torch.randn(4, width, requires_grad=True)
    weights = [t for layer in model for t in (layer.weight, layer.weight_scale)]
    new, out = saved_bytes(model, x, exclude=weights)
    everything, _ = saved_bytes(model, x)
    old_bf16_copies = layers * width * width * 2
    assert new == 0
    assert everything == layers * (width * width + 4)   # the fp8 weights (1 byte) and scales

    class Upcast(nn.Module):   # the old behaviour, for comparison
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return nn.functional.linear(x.to(torch.bfloat16), self.layer.dequantized_weight())

    old, old_out = saved_bytes(nn.Sequential(*[Upcast(layer) for layer in model]), x, exclude=weights)
    assert old >= old_bf16_copies
    torch.testing.assert_close(out, old_out, atol=0, rtol=0)
    out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


class Block(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x, checkpointed=False):
        def run(x):
            for layer in self.layers:
                x = torch.nn.functional.gelu(layer(x))
            return x
        return checkpoint(run, x, use_reentrant=False) if checkpointed else run(x)


def test_inside_non_reentrant_checkpoint():
    block = Block([fp8_pair(64, 64, torch.bfloat16, seed=s)[0] for s in range(3)])
    x = torch.randn(2, 5, 64)
    plain_out, plain_grad = input_grad(block, x, torch.bfloat16)
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x, checkpointed=True)
    out.float().square().sum().backward()
    torch.testing.assert_close(out.detach(), plain_out, atol=0, rtol=0)
    torch.testing.assert_close(x.grad, plain_grad, atol=0, rtol=0)


def test_inference_mode_and_no_grad_take_the_plain_path():
    layer, reference = fp8_pair(compute_dtype=torch.bfloat16)
    x = torch.randn(3, 64)
    with torch.inference_mode():
        out = layer(x)
    assert out.is_inference() and out.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(out, reference(x.bfloat16()), atol=0, rtol=0)
        assert layer(x).grad_fn is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("autocast", [torch.bfloat16, torch.float16])
def test_cuda_autocast(autocast):
    layer, reference = fp8_pair(compute_dtype=torch.bfloat16)
    layer, reference = layer.cuda(), reference.cuda()
    x = torch.randn(2, 5, 64, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=autocast):
        out, expected = layer(x), reference(x)
    assert out.dtype == expected.dtype == autocast
    grad, = torch.autograd.grad(out.float().sum(), x)
    expected_grad, = torch.autograd.grad(expected.float().sum(), x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad, expected_grad)
