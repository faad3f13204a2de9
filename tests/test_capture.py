"""Capture: tuple outputs, input hooks, inference mode, early stop, and no hook left behind."""

from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

from neuronmap.capture import Capture


@dataclass(frozen=True)
class Ref:
    name: str
    module: torch.nn.Module
    module_path: str
    hook: str = "output"
    select: Callable[[Any], torch.Tensor] = lambda out: out[0] if isinstance(out, tuple) else out
    kind: str = "hidden"


class TupleBlock(torch.nn.Module):
    """Returns a tuple like a Hugging Face block does."""

    def __init__(self, fail: bool = False):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.fail = fail
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.fail:
            raise RuntimeError("boom")
        return (self.linear(x), None)


class Net(torch.nn.Module):
    def __init__(self, fail_at: int | None = None):
        super().__init__()
        self.blocks = torch.nn.ModuleList(TupleBlock(fail=i == fail_at) for i in range(3))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)[0]
        return x


def all_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def refs_for(net):
    return [Ref(f"blocks.{i}", b, f"blocks.{i}") for i, b in enumerate(net.blocks)]


def test_tuple_outputs_are_detached_tensors_equal_to_manual_forward():
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(2, 5, 4, requires_grad=True)
    with Capture(refs_for(net)) as cap:
        cap.run(net, x)
    expected = x
    for i, block in enumerate(net.blocks):
        expected = block.linear(expected)
        torch.testing.assert_close(cap.outputs[f"blocks.{i}"], expected)
        assert not cap.outputs[f"blocks.{i}"].requires_grad
    assert all_hooks(net) == 0


def test_input_hook_sees_positional_and_keyword_inputs():
    net = Net()
    x = torch.randn(2, 3, 4)
    ref = Ref("embed", net.blocks[0], "blocks.0", hook="input",
              select=lambda ak: ak[0][0] if ak[0] else ak[1]["x"])
    with Capture([ref]) as cap:
        cap.run(net, x)
        torch.testing.assert_close(cap.outputs["embed"], x)
        cap.run(net.blocks[0], x=x * 2)
        torch.testing.assert_close(cap.outputs["embed"], x * 2)


def test_works_under_inference_mode_and_applies_transform_in_hook():
    net = Net()
    x = torch.randn(2, 3, 4)
    with torch.inference_mode(), Capture(refs_for(net), transform=lambda ref, t: t.mean(1)) as cap:
        cap.run(net, x)
    assert cap.outputs["blocks.2"].shape == (2, 4)


def test_stop_early_skips_later_blocks():
    net = Net()
    with Capture(refs_for(net)[:1], stop_early=True) as cap:
        result = cap.run(net, torch.randn(1, 2, 4))
    assert result is None
    assert [b.calls for b in net.blocks] == [1, 0, 0]
    assert all_hooks(net) == 0


def test_no_hook_left_after_failing_forward():
    net = Net(fail_at=1)
    with pytest.raises(RuntimeError, match="boom"):
        with Capture(refs_for(net)) as cap:
            cap.run(net, torch.randn(1, 2, 4))
    assert all_hooks(net) == 0


def test_duplicate_layers_rejected():
    net = Net()
    refs = refs_for(net)
    with pytest.raises(ValueError, match="requested twice"):
        Capture([refs[0], refs[0]])


def test_gradients_reach_a_reshaped_capture(tiny_model):
    """OPT's MLP emits flat (batch * seq, d) rows that the `blocks.i.mlp` ref views as (batch, seq, d).
    With detach=False the gradient with respect to that view must be the gradient of the model's output
    with respect to the MLP output, here taken independently through a zero tensor added in a hook."""
    loaded = tiny_model("opt")
    model = loaded.model
    ref = loaded.adapter.resolve("blocks.0.mlp")[0]
    ids = torch.tensor([[2, 10, 11, 12, 13], [2, 14, 15, 16, 17]])
    mask = torch.ones_like(ids)

    with torch.enable_grad(), Capture([ref], detach=False) as capture:
        out = capture.run(model, input_ids=ids, attention_mask=mask).last_hidden_state
        (got,) = torch.autograd.grad(out.pow(2).sum(), capture.outputs[ref.name])

    zero = torch.zeros(ids.numel(), model.config.hidden_size, requires_grad=True)
    handle = ref.module.register_forward_hook(lambda _m, _a, output: output + zero)
    try:
        with torch.enable_grad():
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
            (expected,) = torch.autograd.grad(out.pow(2).sum(), zero)
    finally:
        handle.remove()
    assert got.shape == (2, 5, model.config.hidden_size)
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected.reshape(got.shape))
