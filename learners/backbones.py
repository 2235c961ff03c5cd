"""Backbone networks, used functionally: learners call them with a parameter dict.

BatchNorm layers keep no running statistics (``track_running_stats=False``), as in the
torch.func MAML example: every forward pass normalises with the batch's own statistics, so
calling a backbone never mutates module state and the same weights behave the same in training,
evaluation and serving.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.autograd.function import once_differentiable
from torch.nn.functional import max_unpool2d

from learners.functional import in_plain_autograd

BACKBONES = ("mlp", "conv4", "resnet12")


class MLP(nn.Module):
    """Fully connected ReLU network; the sinusoid paper setting is 1-40-40-1."""

    def __init__(self, in_features: int, out_features: int | None, hidden: Sequence[int] = (40, 40)):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features) if out_features else nn.Identity()
        self.feature_size = width
        self.feature_shape: tuple[int, ...] = (width,)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class _PoolKeepingIndices(torch.autograd.Function):
    """Max-pooling over windows that do not overlap, whose backward keeps only the argmax
    indices. ``torch.max_pool2d``'s autograd node also keeps its input alive for its backward,
    which reads nothing of it but its shape: after BatchNorm that input is a full-resolution map
    nothing else needs, held per block until the task's ``backward``. The backward here is
    ``max_unpool2d`` (the same values as max-pooling's backward where windows do not overlap,
    in the same memory layout), itself differentiable (a gather by the same indices), so inner
    gradients taken with ``create_graph`` work as before."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, window: int) -> Tensor:
        pooled, indices = torch.ops.aten.max_pool2d_with_indices(x, [window, window],
                                                                 [window, window])
        ctx.window, ctx.size = window, x.shape[-2:]
        ctx.save_for_backward(indices)
        return pooled

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        (indices,) = ctx.saved_tensors
        return max_unpool2d(grad, indices, ctx.window, ctx.window, output_size=ctx.size), None


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that, in the CPU autograd loop (``functional.plain_autograd``) and for
    windows that do not overlap (Conv-4's and ResNet-12's 2x2), keeps only its argmax indices
    for the backward (``_PoolKeepingIndices``): the same values and gradients, one full-
    resolution map less held per block. Elsewhere (vmap, torch.func gradients, evaluation) it
    is ``nn.MaxPool2d``."""

    def forward(self, x: Tensor) -> Tensor:
        window = self.kernel_size
        if (not in_plain_autograd() or not torch.is_grad_enabled() or self.return_indices
                or not isinstance(window, int) or self.stride not in (window, (window, window))
                or self.padding not in (0, (0, 0)) or self.dilation not in (1, (1, 1))
                or self.ceil_mode or x.dim() != 4 or not _outside_transforms()):
            return super().forward(x)
        return _PoolKeepingIndices.apply(x, window)


def _outside_transforms() -> bool:
    """Whether no torch.func transform (grad, vmap, ...) is running: some learners take
    torch.func gradients inside the autograd loop (the LSTM meta-learner, MetaNet), and an
    ``autograd.Function`` without ``setup_context`` cannot run under one. The transform may wrap
    only the parameters (``grad`` of a ``functional_call``) while the input is plain data, so
    this asks torch itself -- the very test ``autograd.Function.apply`` makes -- rather than
    looking at the input."""
    return not torch._C._are_functorch_transforms_active()


class _Conv(torch.autograd.Function):
    """A convolution without bias whose backward is ``_ConvBackward``: ATen's kernels forward and
    backward, and a second derivative that computes only what is asked for."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, options: tuple) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.options = options
        stride, padding, dilation, groups = options
        return torch.conv2d(x, weight, None, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        if not torch.is_grad_enabled():  # no graph wanted (the outer backward): the kernel alone
            return (*_ConvBackward.kernel(grad, x, weight, ctx.options,
                                          ctx.needs_input_grad[:2]), None)
        return (*_ConvBackward.apply(grad, x, weight, ctx.options, ctx.needs_input_grad[:2]),
                None)


class _ConvBackward(torch.autograd.Function):
    """A convolution's backward, ``(g, x, w) -> (dx, dw)`` by ATen's ``convolution_backward``,
    and its own derivative. Given cotangents A (of dx) and B (of dw):

        d/dg = conv(A, w) + conv(x, B)
        d/dx = conv_transpose(g, B)       (the input gradient of a convolution with weight B)
        d/dw = the weight gradient of a convolution of A, with output gradient g

    each only where it is needed. ATen's ``_convolution_double_backward`` computes d/dx even
    when x does not take gradients (the first layer's input is the data), a transposed
    convolution over the first block's full-resolution map per inner step, and computes d/dw
    as a convolution with the batch as channels; here both are oneDNN's backward kernels. Not
    differentiable again (``once_differentiable``)."""

    @staticmethod
    def forward(ctx: Any, grad: Tensor, x: Tensor, weight: Tensor, options: tuple,
                mask: tuple[bool, bool]) -> tuple[Tensor | None, Tensor | None]:
        ctx.save_for_backward(grad, x, weight)
        ctx.options = options
        return _ConvBackward.kernel(grad, x, weight, options, mask)

    @staticmethod
    def kernel(grad: Tensor, x: Tensor, weight: Tensor, options: tuple,
               mask: tuple[bool, bool]) -> tuple[Tensor | None, Tensor | None]:
        stride, padding, dilation, groups = options
        dx, dweight, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, stride, padding, dilation, False, [0, 0], groups,
            [mask[0], mask[1], False])
        return dx, dweight

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, a: Tensor | None, b: Tensor | None) -> tuple[Tensor | None, ...]:
        grad, x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.options
        need_grad, need_x, need_weight = ctx.needs_input_grad[:3]
        d_grad = d_x = d_weight = None
        if need_grad:
            if a is not None:
                d_grad = torch.conv2d(a, weight, None, stride, padding, dilation, groups)
            if b is not None:
                other = torch.conv2d(x, b, None, stride, padding, dilation, groups)
                d_grad = other if d_grad is None else d_grad.add_(other)
        if need_x and b is not None:
            d_x = torch.ops.aten.convolution_backward(
                grad, x, b, None, stride, padding, dilation, False, [0, 0], groups,
                [True, False, False])[0]
        if need_weight and a is not None:
            d_weight = torch.ops.aten.convolution_backward(
                grad, a, weight, None, stride, padding, dilation, False, [0, 0], groups,
                [False, True, False])[1]
        return d_grad, d_x, d_weight, None, None


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (without bias, zero padding) that, in the CPU autograd loop
    (``functional.plain_autograd``), runs as ``_Conv``: the same values and gradients, and a
    second derivative with no unneeded convolution. Elsewhere it is ``nn.Conv2d``."""

    def forward(self, x: Tensor) -> Tensor:
        if (not in_plain_autograd() or not torch.is_grad_enabled() or self.bias is not None
                or self.padding_mode != "zeros" or isinstance(self.padding, str)
                or x.dim() != 4 or not _outside_transforms()):
            return super().forward(x)
        return _Conv.apply(x, self.weight, (self.stride, self.padding, self.dilation,
                                            self.groups))


class _BatchNorm(torch.autograd.Function):
    """Training-mode BatchNorm (batch statistics, no running ones) whose backward is
    ``_BatchNormBackward``: the same kernels forward and backward as ``F.batch_norm``, and a
    second derivative written out below instead of autograd's generic one."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        y, mean, rstd = torch.ops.aten.native_batch_norm(x, weight, bias, None, None, True, 0.0,
                                                         eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, rstd = ctx.saved_tensors
        if not torch.is_grad_enabled():  # no graph wanted (the outer backward): the kernel alone
            return (*torch.ops.aten.native_batch_norm_backward(
                grad, x, weight, None, None, mean, rstd, True, ctx.eps, [True, True, True]),
                None)
        return (*_BatchNormBackward.apply(grad, x, weight, mean, rstd, ctx.eps), None)


class _BatchNormBackward(torch.autograd.Function):
    """BatchNorm's backward, ``(g, x, gamma) -> (dx, dgamma, dbeta)`` by ATen's fused kernel, and
    its own derivative (what second-order MAML's outer backward runs once per inner step and
    layer) in closed form. Per channel, over its M values, with x^ = (x - mean) r, r = (var +
    eps)^-1/2, means <u> and <u, v> = <u v>, and incoming cotangents A (of dx), b (of dgamma)
    and c (of dbeta); g_ = <g> = dbeta / M and q = <g, x^> = dgamma / M come from the forward:

        d/dg     = gamma r (A - <A> - x^ <A, x^>) + b x^ + c
        d/dx     = gamma r^2 (-x^ (<A, g> - <A> g_ - 3 <A, x^> q) - (A - <A>) q - <A, x^> (g - g_))
                   + b r (g - g_ - x^ q)
        d/dgamma = r M (<A, g> - <A> g_ - <A, x^> q)

    (the derivative of dx = gamma r (g - g_ - x^ q) and of dgamma = M q, dbeta = M g_). ATen's
    own (``batchnorm_double_backward``) computes the same from the general formula in about
    thirty passes over the activations, several of them strided reductions; this takes three
    reductions and eight elementwise passes, and reuses dgamma and dbeta. Not differentiable
    again (``once_differentiable``): nothing in orch takes a third derivative."""

    @staticmethod
    def forward(ctx: Any, grad: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
                eps: float) -> tuple[Tensor, Tensor, Tensor]:
        dx, dweight, dbias = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, None, None, mean, rstd, True, eps, [True, True, True])
        ctx.save_for_backward(grad, x, weight, mean, rstd, dweight, dbias)
        return dx, dweight, dbias

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, a: Tensor | None, b: Tensor | None,
                 c: Tensor | None) -> tuple[Tensor | None, ...]:
        grad, x, weight, mean, rstd, dweight, dbias = ctx.saved_tensors
        channels = x.shape[1]
        inverse = 1.0 / (x.numel() // channels)
        shape = (1, channels, 1, 1)
        a = torch.zeros_like(x) if a is None else a
        b = torch.zeros_like(weight) if b is None else b
        c = torch.zeros_like(weight) if c is None else c
        # The three means over each channel's values, in one pass each; <A, x^> from <A, x>.
        a_mean, a_x, a_g = torch.stack([a.sum((0, 2, 3)), (a * x).sum((0, 2, 3)),
                                        (a * grad).sum((0, 2, 3))]).mul_(inverse).unbind()
        a_x = (a_x - mean * a_mean).mul_(rstd)
        g_mean, q = dbias * inverse, dweight * inverse
        k = weight * rstd
        kr = k * rstd
        br = b * rstd
        inner = a_g - a_mean * g_mean - a_x * q
        # Each result is u A + v x + w [+ t g] per channel, x^ folded into x: x^ = r x - r mean.
        on_x_grad = (b - k * a_x).mul_(rstd)
        d_grad = (a * k.view(shape)).addcmul_(x, on_x_grad.view(shape)).add_(
            (c - k * a_mean - on_x_grad * mean).view(shape))
        on_x = (kr * (2 * a_x * q - inner) - br * q).mul_(rstd)
        d_x = (a * (-kr * q).view(shape)).addcmul_(grad, (br - kr * a_x).view(shape))
        d_x.addcmul_(x, on_x.view(shape)).add_(
            (kr * (a_mean * q + a_x * g_mean) - br * g_mean - on_x * mean).view(shape))
        d_weight = rstd * inner / inverse
        return d_grad, d_x, d_weight, None, None, None


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that, in the CPU autograd loop (``functional.plain_autograd``) and on
    batch statistics, runs as ``_BatchNorm``: the same values and gradients, and a second
    derivative that costs a fraction of autograd's. Elsewhere it is ``nn.BatchNorm2d``."""

    def forward(self, x: Tensor) -> Tensor:
        if (not in_plain_autograd() or not torch.is_grad_enabled() or self.track_running_stats
                or not self.training or self.weight is None or x.dim() != 4
                or not _outside_transforms()):
            return super().forward(x)
        return _BatchNorm.apply(x, self.weight, self.bias, self.eps)


class ConvBlock(nn.Sequential):
    """Conv 3x3, BatchNorm, ReLU, 2x2 max-pool: the modules in the literature's order (networks
    that walk the layers, such as MetaNet's layer augmentation, see that order). The forward
    pass pools before the ReLU: ReLU and max commute exactly, in value and in gradient (both are
    monotone; a pooled window whose maximum is not positive passes no gradient either way), and
    the ReLU then runs, forward and backward, on a quarter of the values."""

    # The order the forward pass runs the four modules in (networks that run the modules one by
    # one, such as MAML++'s per-step BatchNorm forward, follow it too).
    FORWARD_ORDER = (0, 1, 3, 2)

    def forward(self, x: Tensor) -> Tensor:
        for index in self.FORWARD_ORDER:
            x = self[index](x)
        return x


def conv_block(in_channels: int, out_channels: int) -> ConvBlock:
    # No convolution bias: the BatchNorm after it subtracts the batch mean, so a bias could never
    # change the output and would be a parameter with an identically zero gradient.
    return ConvBlock(
        Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        BatchNorm2d(out_channels, track_running_stats=False),
        # In place: it runs after the pool (FORWARD_ORDER), on a map nothing keeps for backward.
        nn.ReLU(inplace=True),
        MaxPool2d(2),
    )


class Conv4(nn.Module):
    """The four-block convolutional network of the few-shot literature (64 filters, 3x3, BN, ReLU,
    2x2 max-pool), with an optional linear head for gradient-based learners."""

    def __init__(self, input_shape: Sequence[int], out_features: int | None, filters: int = 64):
        super().__init__()
        channels, height, width = input_shape
        self.body = nn.Sequential(
            conv_block(channels, filters), conv_block(filters, filters),
            conv_block(filters, filters), conv_block(filters, filters), nn.Flatten())
        for _ in range(4):
            height, width = height // 2, width // 2
        # The last block's feature maps, [C, H, W], before flattening (Relation Networks compare
        # maps rather than vectors).
        self.feature_shape: tuple[int, ...] = (filters, max(height, 1), max(width, 1))
        self.feature_size = filters * max(height, 1) * max(width, 1)
        self.head = nn.Linear(self.feature_size, out_features) if out_features else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class ResidualBlock(nn.Module):
    """One ResNet-12 block: three 3x3 conv-BN-LeakyReLU(0.1) layers (the third's activation after
    the addition) beside a 1x1 conv-BN shortcut, then a 2x2 max-pool."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        def conv(i: int, o: int, k: int = 3) -> list[nn.Module]:
            return [Conv2d(i, o, k, padding=k // 2, bias=False),
                    BatchNorm2d(o, track_running_stats=False)]

        self.body = nn.Sequential(*conv(in_channels, out_channels), nn.LeakyReLU(0.1),
                                  *conv(out_channels, out_channels), nn.LeakyReLU(0.1),
                                  *conv(out_channels, out_channels))
        self.shortcut = nn.Sequential(*conv(in_channels, out_channels, 1))
        self.out = nn.Sequential(nn.LeakyReLU(0.1), MaxPool2d(2))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.body(x) + self.shortcut(x))


# ResNet-12's block widths relative to the first: 64 filters give the papers' 64-160-320-640.
RESNET12_WIDTHS = (1.0, 2.5, 5.0, 10.0)


class ResNet12(nn.Module):
    """The ResNet-12 of TADAM, MetaOptNet and most later few-shot work: four residual blocks of
    ``filters`` x 1, 2.5, 5 and 10 channels, each ending in a 2x2 max-pool, flattened (no average
    pooling, as MetaOptNet); an optional linear head for gradient-based learners. DropBlock is
    left out."""

    def __init__(self, input_shape: Sequence[int], out_features: int | None, filters: int = 64):
        super().__init__()
        channels, height, width = input_shape
        widths = [max(1, round(filters * scale)) for scale in RESNET12_WIDTHS]
        blocks: list[nn.Module] = []
        for out_channels in widths:
            blocks.append(ResidualBlock(channels, out_channels))
            channels, height, width = out_channels, height // 2, width // 2
        if height < 1 or width < 1:
            raise ValueError(f"backbone 'resnet12' pools four times; inputs of "
                             f"{tuple(input_shape[1:])} pixels are too small (at least 16x16)")
        self.body = nn.Sequential(*blocks, nn.Flatten())
        self.feature_size = channels * height * width
        self.head = nn.Linear(self.feature_size, out_features) if out_features else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def build_backbone(name: str, input_shape: Sequence[int], out_features: int | None, *,
                   hidden: Sequence[int] = (40, 40), filters: int = 64) -> nn.Module:
    """The backbone ``name`` for inputs of ``input_shape``; ``out_features=None`` drops the head."""
    if name == "mlp":
        if len(input_shape) != 1:
            raise ValueError(f"backbone 'mlp' needs flat inputs, got shape {tuple(input_shape)}; "
                             "use 'conv4' or 'resnet12' for images")
        return MLP(input_shape[0], out_features, hidden)
    if name == "conv4":
        if len(input_shape) != 3:
            raise ValueError(f"backbone 'conv4' needs [C, H, W] inputs, got shape {tuple(input_shape)}")
        return Conv4(input_shape, out_features, filters)
    if name == "resnet12":
        if len(input_shape) != 3:
            raise ValueError(f"backbone 'resnet12' needs [C, H, W] inputs, got shape {tuple(input_shape)}")
        return ResNet12(input_shape, out_features, filters)
    raise ValueError(f"unknown backbone {name!r}; allowed: {', '.join(BACKBONES)}")


def call(backbone: nn.Module, params: dict[str, Tensor], x: Tensor) -> Tensor:
    """Run ``backbone`` with ``params`` in place of its own weights (a pure function)."""
    return functional_call(backbone, params, (x,))
